import numpy as np
import pyarrow as pa
import pytest
import torch

from training.schema.signal import SparseSignal, signal_columns, signal_statistics, signal_violations, signals_from_columns, topk_signal


def test_topk_signal_on_known_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    ids, logprobs, token_logprob, tail = topk_signal(logits, torch.tensor([2]), k=2)
    assert ids.tolist() == [[0, 1]] and ids.dtype == torch.int32
    assert torch.allclose(logprobs.exp(), torch.tensor([[0.5, 0.3]]))
    assert torch.allclose(token_logprob.exp(), torch.tensor([0.15]))
    assert tail.item() == pytest.approx(0.2, abs=1e-6)


def test_temperature_divides_the_logits():
    logits = torch.randn(3, 10)
    _, logprobs, _, _ = topk_signal(logits, torch.zeros(3, dtype=torch.long), k=10, temperature=2.0)
    expected = torch.log_softmax(logits / 2.0, -1).sort(-1, descending=True).values
    assert torch.allclose(logprobs, expected, atol=1e-6)


def test_full_vocabulary_leaves_no_tail():
    _, _, _, tail = topk_signal(torch.randn(5, 7), torch.zeros(5, dtype=torch.long), k=7)
    assert torch.all(tail < 1e-6)


def _signals(lengths, k=3, vocab=10):
    rng = np.random.default_rng(0)
    out = []
    for length in lengths:
        logits = torch.from_numpy(rng.normal(size=(length, vocab)).astype(np.float32))
        parts = topk_signal(logits, torch.zeros(length, dtype=torch.long), k)
        out.append(SparseSignal(*(p.numpy() for p in parts)))
    return out


def test_arrow_columns_round_trip():
    signals = _signals([4, 0, 2])
    columns = signal_columns(signals)
    assert columns["topk_ids"].to_pylist()[0] == signals[0].topk_ids.tolist()
    assert columns["topk_ids"].to_pylist()[1] == []
    np.testing.assert_allclose(columns["topk_logprobs"].to_pylist()[2], signals[2].topk_logprobs, rtol=1e-6)
    assert columns["tail_mass"].to_pylist()[2] == pytest.approx(signals[2].tail_mass.tolist())
    stats = signal_statistics(signals)
    assert stats["tokens"] == 6 and 0 < stats["mean_topk_entropy"] <= np.log(3) + 1e-6


def _table(signals, k=3):
    return pa.table({**signal_columns(signals), "k": pa.array([k] * len(signals), pa.int32())})


def test_valid_signal_has_no_violations():
    assert not any(signal_violations(_table(_signals([4, 2])), vocab_size=10).values())


@pytest.mark.parametrize(
    "corrupt, violation",
    [
        (lambda s: s.topk_ids.__setitem__((0, 0), 10), "ids_out_of_vocab"),
        (lambda s: s.topk_logprobs.__setitem__((1, 0), 0.5), "logprob_positive"),
        (lambda s: s.topk_logprobs.__setitem__((1, 2), np.nan), "logprob_not_finite"),
        (lambda s: s.topk_logprobs.__setitem__((2, slice(None)), [-3.0, -1.0, -2.0]), "topk_not_sorted"),
        (lambda s: s.tail_mass.__setitem__(3, 1.5), "tail_mass_out_of_range"),
    ],
)
def test_each_violation_is_detected(corrupt, violation):
    signals = _signals([4, 2])
    corrupt(signals[0])
    violations = signal_violations(_table(signals), vocab_size=10)
    assert violations[violation] >= 1
    assert sum(violations.values()) == violations[violation]


def test_wrong_width_is_detected():
    assert signal_violations(_table(_signals([4, 2]), k=4), vocab_size=10)["topk_width_mismatch"] == 1


def test_a_signal_of_k_0_keeps_each_tokens_own_logprob():
    """k = 0 (objective kl_advantage's whole need): no top-k, the token's logprob, all the mass in the tail;
    it round-trips through Arrow and is valid."""
    signals = _signals([3, 0, 2], k=0)
    table = _table(signals, k=0)
    assert table["topk_ids"].to_pylist() == [[[], [], []], [], [[], []]] and table["tail_mass"].to_pylist()[0] == [1.0] * 3
    assert table["token_logprob"].to_pylist()[2] == pytest.approx(signals[2].token_logprob.tolist())
    assert not any(signal_violations(table, vocab_size=10).values())
    back = signals_from_columns(table)
    assert [s.topk_ids.shape for s in back] == [(3, 0), (0, 0), (2, 0)]
