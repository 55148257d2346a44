"""The ranking objectives in the one loop: DPO on preference pairs and RRHF on ranked responses,
their formulas by hand, the per-pair normalizer, the teacher's divergence mixed into DPO, and short
trainings of the tiny chat student that move it the way the judgments say."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from training.models.checkpoints import load_model
from training.schema.signal import topk_signal
from training.trainer.loop import accumulate_gradients, train_student
from training.trainer.losses import LossSettings, sparse_batch, sparse_kd_loss
from training.trainer.ranking import dpo_loss, pair_batch, pair_counts, ranked_batch, ranked_counts, rrhf_loss
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for

IDS = pa.list_(pa.int32())


def logprob(logit: float, vocab: int) -> float:
    """log softmax of a position whose logits are all 0 but the token's."""
    return logit - math.log(math.exp(logit) + vocab - 1)


def pair_table(prompts, chosen, rejected, reference_chosen, reference_rejected, signal: dict | None = None) -> pa.Table:
    columns = {"pair_id": [f"pair{i}" for i in range(len(prompts))], "prompt_token_ids": pa.array(prompts, IDS),
               "chosen_token_ids": pa.array(chosen, IDS), "rejected_token_ids": pa.array(rejected, IDS),
               "chosen_sample_id": [f"c{i}" for i in range(len(prompts))], "rejected_sample_id": [f"r{i}" for i in range(len(prompts))],
               "reference_chosen_logprob": pa.array(reference_chosen, pa.float64()),
               "reference_rejected_logprob": pa.array(reference_rejected, pa.float64())}
    return pa.table(columns | (signal or {}))


def teacher_signal(responses: list[list[int]], vocab: int, k: int, seed: int) -> dict:
    """A teacher's top-k signal on each response: (topk_ids, topk_logprobs, tail_mass) lists."""
    generator = torch.Generator().manual_seed(seed)
    ids, logprobs, tails = [], [], []
    for response in responses:
        top_ids, top_logprobs, _, tail = topk_signal(torch.randn(len(response), vocab, generator=generator), torch.tensor(response), k)
        ids.append(top_ids.tolist()), logprobs.append(top_logprobs.tolist()), tails.append(tail.tolist())
    return {"topk_ids": pa.array(ids, pa.list_(IDS)), "topk_logprobs": pa.array(logprobs, pa.list_(pa.list_(pa.float32()))),
            "tail_mass": pa.array(tails, pa.list_(pa.float32()))}


def random_pairs(count: int, vocab: int, seed: int, k: int | None = None) -> pa.Table:
    """`count` pairs of random ids of unequal lengths, random reference sums; with the teacher's
    top-k on both responses when `k` is given."""
    rng = np.random.default_rng(seed)
    ids = [[rng.integers(3, vocab, rng.integers(2, 7)).tolist() for _ in range(count)] for _ in range(3)]
    signal = None
    if k:
        chosen, rejected = (teacher_signal(side, vocab, k, seed + i) for i, side in enumerate(ids[1:]))
        signal = {f"chosen_{name}": column for name, column in chosen.items()} | {
            f"rejected_{name}": column for name, column in rejected.items()} | {
            "k": pa.array([k] * count, pa.int32()), "temperature": pa.array([1.0] * count, pa.float32())}
    return pair_table(*ids, rng.normal(-20, 2, count).tolist(), rng.normal(-20, 2, count).tolist(), signal)


def ranked_table(prompts, responses, scores) -> pa.Table:
    return pa.table({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt_token_ids": pa.array(prompts, IDS),
                     "responses_token_ids": pa.array(responses, pa.list_(IDS)), "scores": pa.array(scores, pa.list_(pa.float64()))})


def test_dpo_is_the_formula():
    """Two pairs, prompt [1, 2]; every completion position's logits are 0 but the next token's, so
    each token's log-prob is `logprob(logit)`; the second pair prefers the rejected response."""
    vocab, beta = 6, 0.5
    rows = pair_table([[1, 2], [1, 2]], [[3, 4], [4]], [[5], [3, 5]], [-3.0, -1.0], [-2.0, -4.0])
    batch = pair_batch(rows, pad_token_id=0)
    logits = torch.zeros(4, 4, vocab)  # sequences: chosen 0, chosen 1, rejected 0, rejected 1
    for sequence, tokens, values in [(0, [3, 4], [2.0, 1.0]), (1, [4], [0.5]), (2, [5], [-1.0]), (3, [3, 5], [3.0, 2.0])]:
        for i, (token, value) in enumerate(zip(tokens, values)):
            logits[sequence, 1 + i, token] = value  # position prompt_length + i − 1 predicts completion token i
    chosen = [logprob(2.0, vocab) + logprob(1.0, vocab), logprob(0.5, vocab)]
    rejected = [logprob(-1.0, vocab), logprob(3.0, vocab) + logprob(2.0, vocab)]
    margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, [-3.0, -1.0], [-2.0, -4.0])]
    losses = [math.log(1 + math.exp(-m)) for m in margins]
    assert margins[0] > 0 > margins[1]

    loss, parts = dpo_loss(logits, batch, LossSettings(preference_beta=beta), 1.0, pair_counts(rows))
    assert loss.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert parts["dpo"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert parts["margin"] == pytest.approx(sum(margins) / 2, rel=1e-5) and parts["accuracy"] == 0.5

    rpo, parts = dpo_loss(logits, batch, LossSettings(preference_beta=beta, nll_weight=0.3), 1.0, pair_counts(rows))
    assert rpo.item() == pytest.approx(sum(losses) / 2 - 0.3 * sum(chosen) / 3, rel=1e-6)  # NLL per chosen token: 3 of them
    assert parts["nll"] == pytest.approx(-sum(chosen) / 3, rel=1e-6)


def test_rrhf_is_the_formula_and_ties_rank_nothing():
    """Prompt 0: three responses scored 1, 3, 1 (the two 1s tie); prompt 1: two responses tied at 2,
    whose best is the first. p_i is each response's mean token log-prob."""
    vocab = 6
    rows = ranked_table([[1, 2], [1]], [[[3, 4], [5], [3, 4, 5]], [[4], [5, 3]]], [[1.0, 3.0, 1.0], [2.0, 2.0]])
    batch = ranked_batch(rows, pad_token_id=0)
    values = [[2.0, 1.0], [0.5], [-1.0, -2.0, 0.0], [1.5], [-0.5, 0.5]]  # sequences: 0.0, 0.1, 0.2, 1.0, 1.1
    prompt_lengths = [2, 2, 2, 1, 1]
    logits = torch.zeros(5, 4, vocab)
    for sequence, (tokens, logit_values) in enumerate(zip([[3, 4], [5], [3, 4, 5], [4], [5, 3]], values)):
        for i, (token, value) in enumerate(zip(tokens, logit_values)):
            logits[sequence, prompt_lengths[sequence] + i - 1, token] = value
    p = [sum(logprob(v, vocab) for v in vs) / len(vs) for vs in values]
    assert p[0] > p[1] > p[2] and p[3] != p[4]  # so a tie counted either way would change the rank loss
    rank = [max(0.0, p[0] - p[1]) + max(0.0, p[2] - p[1]), 0.0]
    ft = [-p[1], -p[3]]

    loss, parts = rrhf_loss(logits, batch, LossSettings(), 1.0, ranked_counts(rows))
    assert loss.item() == pytest.approx((sum(rank) + sum(ft)) / 2, rel=1e-6)
    assert parts["rank"] == pytest.approx(sum(rank) / 2, rel=1e-6) and parts["ft"] == pytest.approx(sum(ft) / 2, rel=1e-6)


def test_kd_weight_adds_the_divergence_on_both_responses():
    """DPO + kd_weight × `sparse_kd_loss` on the 2P response sequences, unpivoted here by hand."""
    vocab, k = 32, 4
    rows = random_pairs(3, vocab, seed=1, k=k)
    settings = LossSettings(divergence="forward_kl", temperature=2.0, preference_beta=0.2, kd_weight=0.7)
    logits = torch.randn(6, 12, vocab, requires_grad=True)
    loss, parts = dpo_loss(logits, pair_batch(rows, 0), settings, 1.0, pair_counts(rows))

    columns = rows.to_pydict()
    sequences = pa.table({
        "prompt_token_ids": pa.array(columns["prompt_token_ids"] * 2, IDS),
        "completion_token_ids": pa.array(columns["chosen_token_ids"] + columns["rejected_token_ids"], IDS),
        **{name: columns[f"chosen_{name}"] + columns[f"rejected_{name}"] for name in ("topk_ids", "topk_logprobs", "tail_mass")},
        "k": [k] * 6, "temperature": [1.0] * 6})
    divergence, _ = sparse_kd_loss(logits, sparse_batch(sequences, 0), settings.model_copy(update={"nll_weight": 0.0}), 1.0)
    dpo, _ = dpo_loss(logits, pair_batch(rows, 0), settings.model_copy(update={"kd_weight": 0.0}), 1.0, pair_counts(rows))
    assert loss.item() == pytest.approx(dpo.item() + 0.7 * divergence.item(), rel=1e-6)
    assert parts["divergence"] == pytest.approx(divergence.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected,) = torch.autograd.grad(dpo + 0.7 * divergence, logits)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def student(chat_pair):
    return load_model(str(chat_pair["student"]))


def gradient(model, rows, settings) -> tuple[float, dict, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, parts, _ = accumulate_gradients(model, rows, 0, settings, "fixed", 1.0, torch.device("cpu"))
    return loss, parts, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("objective", ["dpo", "rrhf"])
def test_the_loss_is_per_pair_whatever_the_micro_batches(student, objective):
    """4 pairs (prompts) of unequal lengths: micro-batches of 1 and 2 rows take the gradient of one
    batch, DPO's per-token terms (NLL of the chosen, the teacher's divergence) included."""
    model, _ = student
    vocab = model.config.vocab_size
    if objective == "dpo":
        rows, losses = random_pairs(4, vocab, seed=2, k=4), {"nll_weight": 0.5, "kd_weight": 0.3}
    else:
        rng = np.random.default_rng(3)
        rows, losses = ranked_table([rng.integers(3, vocab, rng.integers(2, 6)).tolist() for _ in range(4)],
                                    [[rng.integers(3, vocab, rng.integers(1, 7)).tolist() for _ in range(n)] for n in (3, 2, 4, 3)],
                                    [rng.integers(0, 3, n).astype(float).tolist() for n in (3, 2, 4, 3)]), {}
    results = [gradient(model, rows, TrainingSettings(objective=objective, batch_size=4, micro_batch_size=micro, preference_beta=0.5,
                                                      **losses)) for micro in (None, 1, 2)]
    (loss, parts, grads), *others = results
    assert loss > 0
    for other_loss, other_parts, other_grads in others:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        assert other_parts[next(iter(parts))] == pytest.approx(parts[next(iter(parts))], rel=1e-5)  # dpo, rank: per pair
        for a, b in zip(grads, other_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def sequence_logprobs(model, prompt: list[int], responses: list[list[int]]) -> list[float]:
    """Σ_t log π(y_t | x, y_<t) of each response, one plain forward each."""
    sums = []
    with torch.no_grad():
        for response in responses:
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
            sums.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum().item())
    return sums


def test_dpo_training_prefers_the_chosen_responses(chat_pair):
    """The reference is the initial student itself, so the first margin is 0; 30 steps on 4 pairs
    open it, and every pair ends on the chosen side."""
    model, tokenizer = load_model(str(chat_pair["student"]))
    rows = random_pairs(4, 200, seed=4)
    columns = rows.to_pydict()
    reference = {side: [sequence_logprobs(model, prompt, [response])[0] for prompt, response in
                        zip(columns["prompt_token_ids"], columns[f"{side}_token_ids"])] for side in ("chosen", "rejected")}
    rows = pair_table(columns["prompt_token_ids"], columns["chosen_token_ids"], columns["rejected_token_ids"],
                      reference["chosen"], reference["rejected"])
    settings = TrainingSettings(objective="dpo", steps=30, batch_size=4, learning_rate=1e-2, warmup_steps=0, device="cpu")
    curve = train_student(model, tokenizer, batches_for(model, tokenizer, settings, rows), settings)
    margins = [c["margin"] for c in curve]
    assert abs(margins[0]) < 1e-4 and curve[0]["dpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert 0 < margins[10] < margins[-1] and curve[-1]["accuracy"] == 1.0
    assert curve[0]["completion_tokens"] == sum(map(len, columns["chosen_token_ids"] + columns["rejected_token_ids"]))


def test_rrhf_training_ranks_the_responses_as_judged(chat_pair):
    """Each prompt's responses judged in the reverse order of the initial student's length-normalized
    log-probs: 30 steps turn its order around, the best response first."""
    model, tokenizer = load_model(str(chat_pair["student"]))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 200, 4).tolist() for _ in range(3)]
    responses = [[rng.integers(3, 200, rng.integers(3, 6)).tolist() for _ in range(3)] for _ in range(3)]

    def normalized() -> list[list[float]]:
        return [[total / len(response) for total, response in zip(sequence_logprobs(model, prompt, candidates), candidates)]
                for prompt, candidates in zip(prompts, responses)]

    scores = [(-np.argsort(np.argsort(p))).astype(float).tolist() for p in normalized()]  # the least likely is the best
    settings = TrainingSettings(objective="rrhf", steps=30, batch_size=3, learning_rate=1e-2, warmup_steps=0, device="cpu")
    curve = train_student(model, tokenizer, batches_for(model, tokenizer, settings, ranked_table(prompts, responses, scores)), settings)
    assert curve[0]["rank"] > 0.05 and curve[-1]["rank"] == 0.0 and curve[-1]["ft"] < curve[0]["ft"] / 4
    for p, judged in zip(normalized(), scores):
        assert np.argsort(p).tolist() == np.argsort(judged).tolist()


def test_rows_the_objective_cannot_train_on_fail_before_training(student, chat_pair):
    model, tokenizer = student
    tokens = pa.table({"prompt_token_ids": pa.array([[5, 6]] * 4, IDS), "completion_token_ids": pa.array([[7, 8]] * 4, IDS)})
    pairs = random_pairs(4, 200, seed=6)
    cases = [("dpo", {}, tokens, r"objective 'dpo' trains on preference pairs .* build them with preference_pairs / round_pairs"),
             ("sft", {}, pairs, r"but the fixed rows hold preference pairs .*: use objective 'dpo'"),
             ("rrhf", {}, pairs, r"objective 'rrhf' trains on ranked responses"),
             ("dpo", {"kd_weight": 0.5}, pairs, r"kd_weight 0.5 adds the teacher's divergence .* carry no teacher signal"),
             ("dpo", {}, random_pairs(4, 2 * model.config.vocab_size, seed=7, k=4),
              rf"sample [cr]\d stores token id \d+, beyond the student's vocabulary of {model.config.vocab_size}"),
             ("rrhf", {}, ranked_table([[5]], [[[6], [7]]], [[1.0]]), r"one score for each"),
             ("dpo", {"divergence": "none", "nll_weight": 1.0, "kd_weight": 0.5}, random_pairs(4, 200, seed=8, k=4),
              r"kd_weight 0.5 mixes the divergence in, and divergence is 'none': set divergence \(e.g. jsd\) or kd_weight 0"),
             ("rrhf", {"kd_weight": 0.5}, ranked_table([[5]], [[[6], [7]]], [[1.0, 0.0]]), r"objective 'rrhf' takes no kd_weight")]
    for objective, options, rows, message in cases:
        with pytest.raises(ValueError, match=message):  # the settings refuse some before any row is read
            settings = TrainingSettings(objective=objective, steps=1, batch_size=1, device="cpu", **options)
            train_student(model, tokenizer, batches_for(model, tokenizer, settings, rows), settings)
