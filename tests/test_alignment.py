"""A teacher with another tokenizer: token bytes, byte-boundary groups, the mapped signal and its loss,
on real tokenizers built here (byte-level BPE, a SentencePiece-style BPE with byte fallback, the
embedded character tokenizer)."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from storage.store import Store
from training.data.labeling import score, with_columns
from training.data.rollouts import feedback_table, to_teacher_tokens
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.launch.command import DistillCommand, run
from training.launch.report import printed
from training.models.alignment import UNMAPPED, CrossTokenizer, groups
from training.models.chat import prompt_rendering, render
from training.models.checkpoints import STUDENT_ARCHITECTURE, build_embedded, end_of_turn_ids, load_model, save_model
from training.models.token_bytes import TokenBytes, same_text_ids, token_table
from training.models.tokenizer import build_byte_level_bpe, build_char_tokenizer, tokenizer_hash
from training.rounds.online import OnlineRollouts, OnlineSettings
from training.schema.signal import SignalSettings
from training.tasks.arithmetic import problems
from training.tasks.arithmetic_task import ArithmeticTask
from training.trainer.loop import train_student
from training.trainer.losses import sparse_batch
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for, cross_tokenizer

TEXTS = ["12 + 3 = 15", "Ünïcode costs €5 😀", "  two  spaces\nand a line"]


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """'▁' for spaces, <0xNN> byte tokens for what the vocabulary lacks (Llama 2's convention)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for text in ["▁", "1", "2", "3", "5", "+", "=", "▁1", "▁+"]:
        vocab.setdefault(text, len(vocab))
    model = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "1"), ("▁", "+")], unk_token="<unk>", byte_fallback=True))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


def merged_pairs() -> PreTrainedTokenizerFast:
    """Characters plus "12" and " +": a teacher whose tokens are known in advance."""
    vocab = {"<pad>": 0, "<eos>": 1, **{c: 2 + i for i, c in enumerate(" +0123456789=")}}
    vocab.update({"12": len(vocab), " +": len(vocab) + 1})
    model = Tokenizer(models.BPE(vocab=vocab, merges=[("1", "2"), (" ", "+")]))
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>", pad_token="<pad>")


def other_bpe() -> PreTrainedTokenizerFast:
    """A second byte-level BPE: another size, other merges and other special tokens than the chat pair's."""
    return build_byte_level_bpe([p.prompt + " " + p.solution for p in problems("train", 300, 7)], vocab_size=420)


@pytest.mark.parametrize("build", [build_char_tokenizer, sentencepiece_like, other_bpe])
def test_token_bytes_spell_the_text(build):
    tokenizer = build()
    spelled = TokenBytes.of(tokenizer)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.unk_token_id in ids:
            continue  # the character tokenizer has no 'Ü'
        assert b"".join(spelled.texts[i] for i in ids) == text.encode()
    assert spelled.texts[tokenizer.eos_token_id] == b"" and spelled.special[tokenizer.eos_token_id]


def test_the_stored_token_table_is_the_tokenizer(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    ends = end_of_turn_ids(model.generation_config, tokenizer)
    stored, stored_ends = TokenBytes.from_table(token_table(tokenizer, ends))
    spelled = TokenBytes.of(tokenizer)
    assert stored.texts == spelled.texts and stored.names == spelled.names and stored_ends == ends
    assert np.array_equal(stored.special, spelled.special)


def test_byte_level_tokens_are_their_bytes(tiny_model_dir):
    tokenizer = load_model(str(tiny_model_dir))[1]
    spelled = TokenBytes.of(tokenizer)
    assert spelled.texts[tokenizer.convert_tokens_to_ids("Ġ")] == b" "
    assert spelled.texts[tokenizer.convert_tokens_to_ids("<|im_end|>")] == b""
    char = TokenBytes.of(build_char_tokenizer())
    to_char = same_text_ids(spelled, char)
    assert to_char[tokenizer.convert_tokens_to_ids("Ġ")] == build_char_tokenizer().convert_tokens_to_ids(" ")
    assert to_char[tokenizer.convert_tokens_to_ids("<|im_end|>")] == -1


def test_groups_on_a_known_string():
    teacher = merged_pairs()
    text = "12 + 3"
    teacher_ids = teacher(text)["input_ids"]
    assert teacher.convert_ids_to_tokens(teacher_ids) == ["12", " +", " ", "3"]
    teacher_ends = np.cumsum(TokenBytes.of(teacher).lengths[teacher_ids])
    teacher_group, student_group = groups(teacher_ends, np.arange(1, len(text) + 1))
    assert teacher_group.tolist() == [0, 1, 2, 3]  # "12" | " +" | " " | "3"
    assert student_group.tolist() == [0, 0, 1, 1, 2, 3]  # one to many, one to many, one to one, one to one


def test_the_signal_maps_onto_the_student(tiny_model_dir):
    """A response "12 + 3<eos>" from the known teacher: its one-to-one tokens keep the candidates the
    student spells alike, the rest joins the tail; its merged tokens get their group's logprob; its end
    of turn becomes the student's."""
    teacher, student = merged_pairs(), build_char_tokenizer()
    v = teacher.get_vocab()
    ids = [v["12"], v[" +"], v[" "], v["3"], v["<eos>"]]
    top = [[v["12"], v["1"]], [v[" +"], v[" "]], [v[" "], v[" +"]], [v["3"], v["12"]], [v["<eos>"], v["3"]]]
    logprobs = np.log([[0.6, 0.3], [0.5, 0.4], [0.7, 0.2], [0.8, 0.1], [0.9, 0.05]])
    rows = pa.table({
        "completion_token_ids": pa.array([ids], pa.list_(pa.int32())),
        "topk_ids": pa.array([top], pa.list_(pa.list_(pa.int32()))),
        "topk_logprobs": pa.array([logprobs.tolist()], pa.list_(pa.list_(pa.float32()))),
        "token_logprob": pa.array([logprobs[:, 0].tolist()], pa.list_(pa.float32())),
        "tail_mass": pa.array([(1 - np.exp(logprobs).sum(1)).tolist()], pa.list_(pa.float32())),
        "k": pa.array([2], pa.int32()),
    })
    cross = CrossTokenizer.between(TokenBytes.of(teacher), [v["<eos>"]], student, [student.eos_token_id], tokenizer_hash(teacher))
    out = cross(rows).to_pylist()[0]
    c = student.get_vocab()
    assert out["completion_token_ids"] == [c["1"], c["2"], c[" "], c["+"], c[" "], c["3"], student.eos_token_id]
    assert out["aligned"] == [False, False, False, False, True, True, True]
    assert out["k"] == 4 and all(lp == UNMAPPED for row in out["topk_logprobs"] for lp in row[2:])  # no longer student tokens
    assert out["topk_ids"][4][:2] == [c[" "], c[" "]] and out["topk_logprobs"][4][1] == UNMAPPED  # " +" is no student token
    assert out["tail_mass"][4] == pytest.approx(0.1 + 0.2)
    assert out["topk_ids"][5][:2] == [c["3"], c["3"]] and out["topk_logprobs"][5][0] == pytest.approx(math.log(0.8))
    assert out["topk_ids"][6][:2] == [student.eos_token_id, c["3"]]
    assert out["group"] == [0, 0, 1, 1, 2, 3, 4]
    assert out["group_logprob"][0] == pytest.approx(math.log(0.6)) and out["group_logprob"][3] == pytest.approx(math.log(0.5))
    assert math.isnan(out["group_logprob"][5])
    assert cross.coverage() == pytest.approx({"teacher_tokens_one_to_one": 3 / 5, "topk_mass_mapped": (0.7 + 0.8 + 0.95) / 2.75})


@pytest.fixture(scope="module")
def labeled(tiny_model_dir):
    """The chat pair's teacher (byte-level BPE, 300 ids) scores 64 worked solutions with its top-8, each
    tokenized as its tokenizer does and ending its turn with <|im_end|>."""
    engine = HFEngine.load(str(tiny_model_dir), batch_size=32)
    tokenizer, chosen = engine.tokenizer, problems("train", 64, 3)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = pa.table({"sample_id": [f"s{i}" for i in range(64)], "prompt": [p.prompt for p in chosen]})
    rows = rows.append_column("prompt_token_ids", pa.array(render(tokenizer, rows), pa.list_(pa.int32())))
    completions = [ids + [end] for ids in tokenizer([p.solution for p in chosen], add_special_tokens=False)["input_ids"]]
    rows = rows.append_column("completion_token_ids", pa.array(completions, pa.list_(pa.int32())))
    rows = rows.append_column("prompt_rendering", pa.array([prompt_rendering(tokenizer)] * 64))
    return with_columns(rows, score(engine, rows, k=8)[0])


def test_one_tokenizer_aligned_maps_one_to_one_and_keeps_the_mass(tiny_model_dir, labeled):
    """Aligning a signal to its own tokenizer maps every token one to one and keeps every position's
    mass (where longer tokens are priced along the text too); a named teacher with the student's
    tokenizer is not aligned at all, so its loss is the shared-tokenizer one."""
    model, tokenizer = load_model(str(tiny_model_dir))
    ends = end_of_turn_ids(model.generation_config, tokenizer)
    cross = CrossTokenizer.between(TokenBytes.of(tokenizer), ends, tokenizer, ends, tokenizer_hash(tokenizer))
    rows = labeled.slice(0, 16)
    aligned = cross(rows)
    assert aligned["completion_token_ids"].to_pylist() == rows["completion_token_ids"].to_pylist()
    assert cross.coverage() == pytest.approx({"teacher_tokens_one_to_one": 1.0, "topk_mass_mapped": 1.0})
    before, after = sparse_batch(rows, tokenizer.pad_token_id), sparse_batch(aligned, tokenizer.pad_token_id)
    kept = torch.where(after.topk_logprobs > UNMAPPED / 2, after.topk_logprobs.exp(), 0.0).sum(-1) + after.tail_mass
    torch.testing.assert_close(kept, before.topk_logprobs.exp().sum(-1) + before.tail_mass, atol=1e-5, rtol=0)
    assert cross_tokenizer(str(tiny_model_dir), model, tokenizer, TrainingSettings()) is None


def small_qwen(tokenizer):
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def test_a_bpe_student_learns_from_a_character_teachers_stored_signal(tiny_offline_store, tmp_path):
    """The tiny graph's trained character-level teacher's teacher_labeled trains a student on a byte-level
    BPE (other size, merges, special tokens) by the plain command, from the teacher's tokens as the graph
    stored them (token_texts), without its checkpoint: the divergence goes down, and the trained model's
    card holds the alignment's coverage."""
    store = Store(tiny_offline_store)
    tokenizer = other_bpe()
    save_model(small_qwen(tokenizer), tokenizer, tmp_path / "start")
    pq.write_table(store.read_dataset("teacher_labeled"), tmp_path / "labeled.parquet")
    config = DistillCommand(objective="supervised_kd", tail_policy="bucket", steps=40, batch_size=16, learning_rate=3e-3, warmup_steps=2,
                            student=str(tmp_path / "start"), data=[str(tmp_path / "labeled.parquet")], output=str(tmp_path / "student"),
                            teacher=str(store.token_texts_path(store.read_card("teacher").tokenizer_hash)))  # no teacher checkpoint
    curve = run(config, printed())
    first, last = (sum(c["divergence"] for c in part) / 5 for part in (curve[:5], curve[-5:]))
    assert last < 0.8 * first, (first, last)
    coverage = json.loads((tmp_path / "student" / "card.json").read_text())["alignment"]
    assert 0.2 < coverage["teacher_tokens_one_to_one"] < 1.0 and 0.5 < coverage["topk_mass_mapped"] <= 1.0, coverage


def test_a_character_student_trains_on_a_bpe_teachers_stored_signal(tiny_model_dir, labeled):
    """The other way round, from the chat pair's (untrained) BPE teacher: the rows reach the character
    student as its own tokens, the loss is finite and goes down (its NLL part: this teacher knows nothing)."""
    model, tokenizer = build_embedded(STUDENT_ARCHITECTURE, seed=0)
    settings = TrainingSettings(objective="supervised_kd", tail_policy="bucket", steps=20, batch_size=16, learning_rate=3e-3,
                                warmup_steps=2, nll_weight=1.0)
    batches = batches_for(model, tokenizer, settings, labeled, teacher=str(tiny_model_dir))
    first = batches.fixed(0)
    assert first["completion_token_ids"][0].as_py()[-1] == tokenizer.eos_token_id
    assert max(max(ids) for ids in first["completion_token_ids"].to_pylist()) < len(tokenizer)
    curve = train_student(model, tokenizer, batches, settings)
    assert all(math.isfinite(c["loss"]) for c in curve) and curve[-1]["loss"] < 0.8 * curve[0]["loss"]
    assert batches.cross.coverage()["teacher_tokens_one_to_one"] > 0.5


def test_a_stored_round_across_tokenizers(tiny_offline_store, tmp_path):
    """A BPE student's samples scored by the tiny graph's character-level teacher in its tokens
    (teacher_feedback across tokenizers), then aligned back onto the very tokens the student sampled
    (one of them spelled byte by byte, not as its tokenizer would), on which the student trains with λ = 1;
    and an online round's fresh batches, scored and aligned the same way."""
    store = Store(tiny_offline_store)
    teacher_card = store.read_card("teacher")
    teacher = HFEngine.load(teacher_card.path, batch_size=16)
    tokenizer = other_bpe()
    save_model(small_qwen(tokenizer), tokenizer, tmp_path / "start")
    student, tokenizer = load_model(str(tmp_path / "start"))
    labeled = store.read_dataset("teacher_labeled")
    rollouts = labeled.slice(0, 16).select(["prompt_id", "prompt", "messages", "system_prompt", "answer", "completion"])
    spelled = TokenBytes.of(tokenizer)
    by_byte = {text: i for i, text in enumerate(spelled.texts) if len(text) == 1}
    texts = rollouts["completion"].to_pylist()
    sampled = [[by_byte[bytes([b])] for b in texts[0].encode()]] + tokenizer(texts[1:], add_special_tokens=False)["input_ids"]
    rollouts = with_columns(rollouts, pa.table({
        "sample_id": [f"s{i}" for i in range(16)], "sample_index": pa.array([0] * 16, pa.int32()),
        "prompt_token_ids": pa.array(render(tokenizer, rollouts), pa.list_(pa.int32())),
        "prompt_rendering": [prompt_rendering(tokenizer)] * 16,
        "completion_token_ids": pa.array([ids + [tokenizer.eos_token_id] for ids in sampled], pa.list_(pa.int32())),
        "tokenizer_hash": [tokenizer_hash(tokenizer)] * 16}))
    student_engine = HFEngine(student, tokenizer, batch_size=16)
    identity = {"student": "start", "student_weights_hash": "h", "tokenizer_hash": tokenizer_hash(tokenizer)}
    to_teacher = to_teacher_tokens(tokenizer, [tokenizer.eos_token_id], teacher)
    feedback, metrics = feedback_table(teacher, student_engine, rollouts, SignalSettings(k=8), teacher_card, ArithmeticTask(), to_teacher)
    assert to_teacher_tokens(teacher.tokenizer, teacher.end_of_turn_ids, teacher) is None  # one tokenizer: nothing to convert
    assert set(feedback["tokenizer_hash"].to_pylist()) == {teacher_card.tokenizer_hash}
    assert feedback["student_completion_token_ids"].to_pylist() == rollouts["completion_token_ids"].to_pylist()
    teacher_spelled = TokenBytes.of(teacher.tokenizer)
    for sampled, scored in zip(rollouts["completion_token_ids"].to_pylist(), feedback["completion_token_ids"].to_pylist()):
        assert b"".join(spelled.texts[i] for i in sampled) == b"".join(teacher_spelled.texts[i] for i in scored)
        assert sampled[-1] == tokenizer.eos_token_id and scored[-1] in teacher.end_of_turn_ids
    assert math.isfinite(metrics["reverse_kl_per_token"])
    pq.write_table(feedback, tmp_path / "feedback.parquet")

    settings = TrainingSettings(objective="supervised_kd", tail_policy="bucket", mix=1.0, steps=6, batch_size=8, learning_rate=3e-3,
                                warmup_steps=1)
    tokens = str(store.token_texts_path(teacher_card.tokenizer_hash))
    batches = batches_for(student, tokenizer, settings, labeled, [str(tmp_path / "feedback.parquet")], teacher=tokens)
    aligned = batches.cross(feedback)
    assert aligned["completion_token_ids"].to_pylist() == rollouts["completion_token_ids"].to_pylist()  # as it sampled them
    batch, teacher_batch = sparse_batch(aligned, tokenizer.pad_token_id), sparse_batch(feedback, teacher.tokenizer.pad_token_id)
    mapped = torch.where(batch.topk_logprobs > UNMAPPED / 2, batch.topk_logprobs.exp(), 0.0)
    assert torch.allclose(mapped.sum(-1) + batch.tail_mass, torch.ones(len(batch.targets)), atol=1e-4)  # every position's mass
    assert abs(float(teacher_batch.topk_logprobs.exp().sum(-1).mean() + teacher_batch.tail_mass.mean()) - 1) < 1e-4
    longer = [(t, int(i)) for t in range(len(batch.targets)) for i, lp in zip(batch.topk_ids[t], batch.topk_logprobs[t])
              if lp > UNMAPPED / 2 and len(spelled.texts[i]) > len(spelled.texts[batch.targets[t]])
              and spelled.texts[i].startswith(spelled.texts[batch.targets[t]])]
    assert longer  # the student's longer tokens that begin with its own, priced along the text
    assert all(aligned["aligned"][0].as_py())  # byte by byte: every token meets one character of the teacher's
    assert batches.on_policy(0)["completion_token_ids"].to_pylist()[0][-1] == tokenizer.eos_token_id
    curve = train_student(student, tokenizer, batches, settings)
    assert all(math.isfinite(c["loss"]) for c in curve)

    # online: each fresh batch scored in the teacher's tokens as it is sampled, and aligned back the same way
    pq.write_table(rollouts.select(["prompt_id", "prompt", "messages", "system_prompt", "answer"]), tmp_path / "prompts.parquet")
    online = OnlineRollouts(student, tokenizer, teacher, OnlineSettings(
        prompts=str(tmp_path / "prompts.parquet"), batches=str(tmp_path / "online"), teacher=teacher_card.path, teacher_card=teacher_card,
        task="arithmetic", k=8, sampling=Sampling(n=1, temperature=1.0, max_new_tokens=12), identity=identity), batch_size=8)
    batches = batches_for(student, tokenizer, settings, labeled, online, teacher=tokens)
    batch = batches.on_policy(0)
    stored = pq.read_table(tmp_path / "online" / "step-000000.parquet")
    assert set(stored["tokenizer_hash"].to_pylist()) == {teacher_card.tokenizer_hash}
    assert batch["completion_token_ids"].to_pylist() == stored["student_completion_token_ids"].to_pylist()


def test_other_objectives_are_refused_across_tokenizers(tiny_model_dir):
    student, tokenizer = build_embedded(STUDENT_ARCHITECTURE, seed=0)
    with pytest.raises(ValueError, match="objective 'dpo' is not aligned across tokenizers"):
        cross_tokenizer(str(tiny_model_dir), student, tokenizer, TrainingSettings(objective="dpo"))
    with pytest.raises(ValueError, match="with tail_policy 'renormalize' nothing holds it"):
        cross_tokenizer(str(tiny_model_dir), student, tokenizer, TrainingSettings())
    assert cross_tokenizer(str(tiny_model_dir), student, tokenizer, TrainingSettings(tail_policy="bucket")) is not None
