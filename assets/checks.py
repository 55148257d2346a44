"""Asset checks: teacher target, token round trip, teacher/student vocab compatibility, sparse signal validity,
eval/train disjointness, and the curated dataset's guarantees."""

import collections

import dagster as dg
import pyarrow.compute as pc

from assets.inputs import teacher_panel
from storage.store import Store
from training.data.curation import duplicate_rows, origin_counts, shared_prompts
from training.embedded.pair import TARGET_EXACT_MATCH
from training.models.checkpoints import load_tokenizer
from training.schema.signal import signal_violations
from training.schema.tables import parquet

ROUND_TRIP_SAMPLE = 256


SIGNAL_COLUMNS = ["k", "topk_ids", "topk_logprobs", "token_logprob", "tail_mass"]
CHECK_ROWS = 8192  # rows per slice the checks read at a time


def _signal_valid(store: Store, name: str) -> dg.AssetCheckResult:
    """Counts the violations shard slice by slice (memory bounded by a slice, not the dataset), each
    row's ids against the vocabulary of the teacher whose tokenizer scored it."""
    vocab = {}
    for card in teacher_panel(store, store.read_card("teacher")).values():
        vocab[card.tokenizer_hash] = max(vocab.get(card.tokenizer_hash, 0), card.vocab_size)
    violations = collections.Counter()
    for rows in store.iter_rows(name, rows=CHECK_ROWS, columns=[*SIGNAL_COLUMNS, "tokenizer_hash"]):
        for tokenizer in pc.unique(rows["tokenizer_hash"]).to_pylist():
            same = rows.filter(pc.equal(rows["tokenizer_hash"], tokenizer))
            if tokenizer in vocab:
                violations.update(signal_violations(same, vocab[tokenizer]))
            else:  # no teacher of teacher_model has this tokenizer: its ids cannot be checked
                violations["rows_of_no_teachers_tokenizer"] += same.num_rows
    violations = dict(violations)
    return dg.AssetCheckResult(passed=not any(violations.values()), metadata=violations)


@dg.asset_check(asset="teacher_labeled", additional_deps=["teacher_model"], blocking=True)
def sparse_signal_valid(store: dg.ResourceParam[Store]) -> dg.AssetCheckResult:
    """Every stored top-k id is inside the teacher's vocab, logprobs are finite, ≤ 0 and sorted,
    tail mass is in [0, 1]."""
    return _signal_valid(store, "teacher_labeled")


@dg.asset_check(asset="curated", name="sparse_signal_valid", additional_deps=["teacher_model"], blocking=True)
def curated_signal_valid(store: dg.ResourceParam[Store]) -> dg.AssetCheckResult:
    """Every kept row carries a valid sparse teacher signal (as `sparse_signal_valid`)."""
    return _signal_valid(store, "curated")


@dg.asset_check(asset="curated", additional_deps=["eval_set"], blocking=True)
def no_eval_items(store: dg.ResourceParam[Store]) -> dg.AssetCheckResult:
    """No curated prompt is an eval prompt (normalized: trimmed, lower case, single spaces)."""
    shared = shared_prompts(parquet(store.shard_paths("curated")), parquet(store.shard_paths("eval_set")))
    return dg.AssetCheckResult(passed=not shared, metadata={"shared_with_eval": len(shared), "examples": shared[:5]})


@dg.asset_check(asset="curated", blocking=True)
def no_duplicate_text(store: dg.ResourceParam[Store]) -> dg.AssetCheckResult:
    """No two curated rows have the same normalized prompt and response."""
    duplicates = duplicate_rows(parquet(store.shard_paths("curated")))
    return dg.AssetCheckResult(passed=duplicates == 0, metadata={"duplicates": duplicates})


@dg.asset_check(asset="curated")
def origin_shares(store: dg.ResourceParam[Store]) -> dg.AssetCheckResult:
    """Reports the share of each origin among kept rows; warns when an origin with candidates kept none."""
    counts = origin_counts(parquet(store.shard_paths("curated")))
    missing = sorted(set(origin_counts(parquet(store.shard_paths("curation_dropped")))) - set(counts))
    return dg.AssetCheckResult(
        passed=not missing,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"no kept rows from {missing}: every candidate of theirs was filtered out" if missing else None,
        metadata={f"share_{o}": round(n / sum(counts.values()), 4) for o, n in sorted(counts.items())},
    )


@dg.asset_check(asset="teacher_labeled", additional_deps=["teacher_model"])
def token_round_trip(store: dg.ResourceParam[Store]) -> dg.AssetCheckResult:
    """decode(encode(text)) == text for stored prompts and completions, with the teacher tokenizer."""
    card = store.read_card("teacher")
    tokenizer = load_tokenizer(card.path, card.revision)
    rows = next(store.iter_rows("teacher_labeled", rows=ROUND_TRIP_SAMPLE, columns=["prompt", "completion"]))
    texts = rows["prompt"].to_pylist() + rows["completion"].to_pylist()
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.batch_decode(encoded, skip_special_tokens=True)
    failures = [t for t, d in zip(texts, decoded) if t != d]
    return dg.AssetCheckResult(
        passed=not failures,
        metadata={"checked": len(texts), "failed": len(failures), "examples": dg.MetadataValue.json(failures[:3])},
    )


@dg.asset_check(asset="teacher_model")
def teacher_reaches_target(store: dg.ResourceParam[Store]) -> dg.AssetCheckResult:
    """The embedded teacher's greedy exact match on the eval split is at least the target; a
    configured model is evaluated by `evals`, not here."""
    card = store.read_card("teacher")
    if card.eval_exact_match is None:
        return dg.AssetCheckResult(passed=True, description=f"{card.name} is a configured model, not trained here")
    return dg.AssetCheckResult(
        passed=card.eval_exact_match >= TARGET_EXACT_MATCH,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"eval_exact_match": card.eval_exact_match, "target": TARGET_EXACT_MATCH},
    )


@dg.asset_check(asset="student_model", additional_deps=["teacher_model"], blocking=True)
def vocab_compatible(store: dg.ResourceParam[Store]) -> dg.AssetCheckResult:
    """Which case applies: teacher and student share a tokenizer (equal tokenizer hashes: the stored ids are
    the student's, and every one must exist in its embedding), or they do not, and the teacher's signal
    is aligned to the student's tokens as it is drawn (training/models/alignment.py; stored data and rounds)."""
    teacher, student = store.read_card("teacher"), store.read_card("student")
    same_tokenizer = teacher.tokenizer_hash == student.tokenizer_hash
    ids_fit = teacher.tokenizer_size <= student.vocab_size
    if not same_tokenizer:
        description = (f"teacher {teacher.name} (tokenizer {teacher.tokenizer_hash}) and student {student.name} (tokenizer "
                       f"{student.tokenizer_hash}) have different tokenizers: the teacher's signal is aligned to the student's "
                       "tokens on byte boundaries (stored data and rounds)")
    elif not ids_fit:
        description = (f"one tokenizer, but the teacher's {teacher.tokenizer_size} ids do not fit the student's embedding "
                       f"of {student.vocab_size}: resize the student's embeddings to the tokenizer")
    else:
        description = "teacher and student share a tokenizer"
    return dg.AssetCheckResult(
        passed=ids_fit or not same_tokenizer,
        description=description,
        metadata={
            "case": "same tokenizer" if same_tokenizer else "different tokenizers, aligned",
            "teacher_vocab_size": teacher.vocab_size,
            "student_vocab_size": student.vocab_size,
            "teacher_tokenizer_hash": teacher.tokenizer_hash,
            "student_tokenizer_hash": student.tokenizer_hash,
        },
    )


@dg.asset_check(asset="eval_set", additional_deps=["seed_prompts"], blocking=True)
def eval_disjoint_from_train(store: dg.ResourceParam[Store]) -> dg.AssetCheckResult:
    """No eval prompt appears among the seed prompts (normalized as curation does)."""
    shared = shared_prompts(parquet(store.shard_paths("eval_set")), parquet(store.shard_paths("seed_prompts")))
    return dg.AssetCheckResult(
        passed=not shared,
        metadata={"eval_prompts": store.dataset_rows("eval_set"), "shared_with_train": len(shared), "examples": shared[:5]},
    )
