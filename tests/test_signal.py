import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from storage.shards import write_parquet
from training.schema.signal import (
    Q8_FLOOR,
    SparseSignal,
    signal_columns,
    signal_statistics,
    signal_violations,
    signals_from_columns,
    topk_signal,
)
from training.trainer.losses import LossSettings, SparseBatch, sparse_kd_loss


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


def test_q8_logprobs_are_a_grid_that_stores_small_and_trains_as_float32(tmp_path):
    """logprob_dtype q8 (codec topk-q8-v1): the logprobs at most 1/32 nat from float32's, on a grid of
    256 values for the top-k, still sorted and valid; the tail mass at float16's precision. At V =
    151,936, with the teacher's top-20 spread over the whole vocabulary, the stored logprobs take at
    most 0.6× float16's bytes and the ids (byte stream split) ≤ 50 bytes per token, and the JSD loss of
    a student on the signal is within 1e-3 of float32's."""
    vocab, k, tokens = 151_936, 20, 1_000
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=generator) * 2.5
    signals = [SparseSignal(*(part.numpy() for part in topk_signal(logits[s: s + 100], torch.zeros(100, dtype=torch.long), k)))
               for s in range(0, tokens, 100)]
    tables = {dtype: pa.table({**signal_columns(signals, dtype), "k": pa.array([k] * len(signals), pa.int32())})
              for dtype in ("float32", "float16", "q8")}
    decoded, original = signals_from_columns(tables["q8"]), signals_from_columns(tables["float32"])
    top = np.concatenate([s.topk_logprobs for s in decoded])
    assert np.abs(top - np.concatenate([s.topk_logprobs for s in original]).clip(Q8_FLOOR)).max() <= 1 / 32 + 1e-6
    assert len(np.unique(top)) <= 256 and (top * 16 == np.round(top * 16)).all()
    np.testing.assert_allclose(np.concatenate([s.tail_mass for s in decoded]), np.concatenate([s.tail_mass for s in original]),
                               rtol=1e-3)
    assert not any(signal_violations(tables["q8"], vocab_size=vocab).values())

    def stored_bytes(dtype: str) -> dict[str, float]:
        """Bytes per token of each column, as the store writes them (`write_parquet`)."""
        write_parquet(tables[dtype], tmp_path / f"{dtype}.parquet")
        group = pq.ParquetFile(tmp_path / f"{dtype}.parquet").metadata.row_group(0)
        columns = (group.column(i) for i in range(group.num_columns))
        return {column.path_in_schema.split(".")[0]: column.total_compressed_size / tokens for column in columns}

    float16, q8 = stored_bytes("float16"), stored_bytes("q8")
    assert q8["topk_logprobs"] <= 0.6 * float16["topk_logprobs"] and q8["topk_ids"] <= 50

    student = torch.randn(1, tokens + 1, vocab, generator=generator) * 2.0 + 0.5 * logits[None, torch.arange(tokens + 1) % tokens]
    targets = torch.from_numpy(np.concatenate([s.topk_ids[:, 0] for s in original])).long()
    losses = []
    for signal in (original, decoded):
        batch = SparseBatch(None, None, torch.zeros(tokens, dtype=torch.long), torch.arange(tokens), targets,
                            torch.from_numpy(np.concatenate([s.topk_ids for s in signal])).long(),
                            torch.from_numpy(np.concatenate([s.topk_logprobs for s in signal])),
                            torch.from_numpy(np.concatenate([s.tail_mass for s in signal])))
        losses.append(sparse_kd_loss(student, batch, LossSettings(divergence="jsd"), 1.0)[0].item())
    assert losses[0] > 0.05 and abs(losses[1] - losses[0]) < 1e-3
