"""Sparse top-20 loss against the dense loss at vocab 151,936, batch × length 4 × 512, on the CPU:
time and peak memory of loss + backward, and the teacher-side tensor sizes. Each variant runs in a
fresh process so that peak RSS belongs to it alone.

    .venv/bin/python bench/losses.py
"""

import resource
import subprocess
import sys
import time

import torch

from training.trainer.losses import LossSettings, SparseBatch, dense_kd_loss, sparse_kd_loss

VOCAB, BATCH, LENGTH, K = 151_936, 4, 512, 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(variant: str) -> None:
    torch.manual_seed(0)
    n = BATCH * (LENGTH - 1)
    rows = torch.arange(BATCH).repeat_interleave(LENGTH - 1)
    positions = torch.arange(LENGTH - 1).repeat(BATCH)
    targets = torch.randint(0, VOCAB, (n,))
    student_logits = torch.randn(BATCH, LENGTH, VOCAB, requires_grad=True)
    objective = LossSettings(divergence="jsd", beta=0.5)
    if variant == "dense":
        teacher_logits = torch.randn(BATCH, LENGTH, VOCAB)
        teacher_bytes = teacher_logits.numel() * 4
        baseline = peak_rss_mb()
        started = time.perf_counter()
        loss, _ = dense_kd_loss(student_logits, teacher_logits, rows, positions, targets, objective)
    else:
        topk = torch.randn(n, K).sort(-1, descending=True).values.log_softmax(-1) - 0.01
        batch = SparseBatch(None, None, rows, positions, targets, torch.randint(0, VOCAB, (n, K)), topk, torch.full((n,), 0.01))
        teacher_bytes = batch.topk_ids.numel() * 4 + topk.numel() * 4 + n * 4
        baseline = peak_rss_mb()
        started = time.perf_counter()
        loss, _ = sparse_kd_loss(student_logits, batch, objective, 1.0)
    loss.backward()
    seconds = time.perf_counter() - started
    print(f"{variant}\t{seconds:.2f}\t{peak_rss_mb() - baseline:.0f}\t{teacher_bytes / 2**20:.1f}")


def main() -> None:
    if len(sys.argv) > 1:
        run(sys.argv[1])
        return
    print(f"vocab {VOCAB:,}, batch × length {BATCH} × {LENGTH}, k={K}, generalized JSD(0.5), loss + backward")
    results = {}
    for variant in ("dense", "sparse"):
        out = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, check=True).stdout
        name, seconds, peak, teacher = out.strip().split("\t")
        results[name] = (float(seconds), float(peak), float(teacher))
        print(f"{name:6s}: {seconds} s, peak memory above inputs {peak} MB, teacher-side tensors {teacher} MB")
    dense, sparse = results["dense"], results["sparse"]
    print(f"sparse/dense: time {sparse[0] / dense[0]:.2f}×, peak memory {dense[1] / sparse[1]:.1f}× lower, "
          f"teacher-side memory {dense[2] / sparse[2]:.0f}× lower")


if __name__ == "__main__":
    main()
