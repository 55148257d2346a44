"""Teacher feedback on the student's own samples (on-policy distillation, GKD).

The student q sampled y ~ q(· | x). The teacher p scores every sampled token into the sparse signal
(top-k, the token's logprob, tail mass), and the student scores the same tokens, so that per sequence

    log_ratio_sum = Σ_t [log q(y_t | x, y_<t) − log p(y_t | x, y_<t)]

is a one-sample Monte-Carlo estimate of the sequence-level reverse KL(q‖p) (its mean over samples
converges to it, since y ~ q). Both sides are at the signal temperature (1, the raw model, by default).
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.engines.base import Engine
from training.labeling import score


def sequence_sums(per_token: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Σ over each list of a list<float> column, vectorized (empty lists sum to 0)."""
    per_token = per_token.combine_chunks() if isinstance(per_token, pa.ChunkedArray) else per_token
    lengths = pc.list_value_length(per_token).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(per_token).to_numpy(zero_copy_only=False).astype(np.float64)
    running = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.cumsum(lengths)
    return pa.array(running[ends] - running[ends - lengths], pa.float64())


def teacher_feedback(
    teacher: Engine,
    student: Engine,
    rollouts: pa.Table,
    k: int,
    signal_temperature: float = 1.0,
    logprob_type: pa.DataType = pa.float32(),
) -> tuple[dict[str, pa.Array], dict]:
    """The teacher's sparse signal on every rollout token, the student's logprob of each token, and
    the per-sequence log-ratio sum. Returns (columns, statistics)."""
    if k > len(teacher.tokenizer):
        raise ValueError(f"k={k} is larger than the teacher's vocabulary ({len(teacher.tokenizer)} tokens); lower k")
    columns, statistics = score(teacher, rollouts, k, signal_temperature, logprob_type)
    student_columns, _ = score(student, rollouts, 1, signal_temperature)  # q at the same temperature as p
    student_logprob = student_columns["token_logprob"]
    log_ratio = pc.subtract(pc.list_flatten(student_logprob), pc.list_flatten(columns["token_logprob"]))
    per_token_ratio = pa.ListArray.from_arrays(student_logprob.offsets, log_ratio)
    columns["student_token_logprob"] = student_logprob
    columns["log_ratio_sum"] = sequence_sums(per_token_ratio)
    tokens = max(1, len(log_ratio))
    statistics["reverse_kl_per_token"] = float(pc.sum(log_ratio).as_py() or 0.0) / tokens
    return columns, statistics
