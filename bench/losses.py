"""The loss of one batch at a real vocabulary: the dense loss (the teacher's full logits), the sparse
top-20 loss on the student's logits, and the fused sparse loss on its hidden states and head, which
never makes the (B, L, V) logits (training/trainer/head.py). Vocab 151,936, hidden size 896 (Qwen2.5-0.5B),
batch × length 4 × 512, generalized JSD(0.5), forward and backward with the head's product included.

Memory is the peak above the inputs (hidden states, head weight, teacher signal), less the head's
gradient (V × H, 0.54 GB in fp32), which every variant makes alike as the optimizer needs it: what is
left is the loss's own temporaries. On the CPU each variant runs in a fresh process (peak RSS); on CUDA
in one process, from torch's allocator (max_memory_allocated).

    .venv/bin/python bench/losses.py                 # CPU, fp32
    python bench/losses.py --device cuda [--bf16]    # CUDA, optionally under bf16 autocast

`--student-step` times whole training steps instead (forward, loss, backward, AdamW) of a randomly
initialised Qwen2.5-0.5B-shaped student (24 layers, tied head) with the logits and with the fused head:
peak memory of the step and seconds per step (`--layers` fewer for a CPU).
"""

import argparse
import resource
import subprocess
import sys
import time

import torch

from training.trainer.losses import HiddenStates, LossSettings, SparseBatch, dense_kd_loss, sparse_kd_loss

VOCAB, HIDDEN, BATCH, LENGTH, K = 151_936, 896, 4, 512, 20
VARIANTS = ("dense", "sparse", "fused")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_signal(batch_size: int, length: int, device: torch.device, input_ids: torch.Tensor | None = None) -> SparseBatch:
    """A random top-K teacher signal (tail mass 0.01) at every position of `batch_size` sequences of
    `length` tokens, whose targets are `input_ids`' next tokens, or random ones without them."""
    n = batch_size * (length - 1)
    targets = torch.randint(0, VOCAB, (n,), device=device) if input_ids is None else input_ids[:, 1:].flatten()
    topk = torch.randn(n, K, device=device).sort(-1, descending=True).values.log_softmax(-1) - 0.01
    return SparseBatch(input_ids, None if input_ids is None else torch.ones_like(input_ids),
                       torch.arange(batch_size, device=device).repeat_interleave(length - 1),
                       torch.arange(length - 1, device=device).repeat(batch_size), targets,
                       torch.randint(0, VOCAB, (n, K), device=device), topk, torch.full((n,), 0.01, device=device))


def run(variant: str, device: torch.device, bf16: bool, repeats: int) -> tuple[float, float, float]:
    """(seconds of the fastest repeat, the loss's peak temporaries in MB, teacher-side MB) of one variant."""
    torch.manual_seed(0)
    batch = random_signal(BATCH, LENGTH, device)
    hidden = torch.randn(BATCH, LENGTH, HIDDEN, device=device, requires_grad=True)
    head = torch.randn(VOCAB, HIDDEN, device=device).div_(HIDDEN**0.5).requires_grad_()  # in place: no temporary in the baseline
    objective = LossSettings(divergence="jsd", beta=0.5)
    if variant == "dense":
        teacher_logits = torch.randn(BATCH, LENGTH, VOCAB, device=device)
        teacher_bytes = teacher_logits.numel() * 4
    else:
        teacher_bytes = (batch.topk_ids.numel() + batch.topk_logprobs.numel() + batch.tail_mass.numel()) * 4
    head_grad_bytes = head.numel() * 4
    times, temporaries = [], None
    for _ in range(repeats):
        hidden.grad = head.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        baseline = peak_bytes(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if variant == "fused":
                dtype = torch.bfloat16 if bf16 else hidden.dtype
                loss, _ = sparse_kd_loss(HiddenStates(hidden, head, dtype), batch, objective, 1.0)
            else:
                logits = hidden @ head.T
                if variant == "dense":
                    loss, _ = dense_kd_loss(logits, teacher_logits, batch.rows, batch.positions, batch.targets, objective)
                else:
                    loss, _ = sparse_kd_loss(logits, batch, objective, 1.0)
        loss.backward()
        del loss
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        if temporaries is None:  # the first repeat's: a process's peak RSS never comes down for the next
            temporaries = peak_bytes(device) - baseline - head_grad_bytes
    return min(times), temporaries / 2**20, teacher_bytes / 2**20


def student_step(device: torch.device, bf16: bool, layers: int, batch_size: int, length: int, steps: int = 4) -> None:
    """Peak memory and s/step of AdamW steps on the sparse top-20 loss, loss_head 'logits' against 'fused'."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from training.trainer.head import student_forward
    from training.trainer.objectives import OBJECTIVES

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=length)
    print(f"{device} {'bf16 autocast' if bf16 else 'fp32'}: a Qwen2.5-0.5B-shaped student ({layers} layers, fp32 weights, AdamW), "
          f"batch × length {batch_size} × {length}, sparse top-{K} JSD(0.5), {steps} steps after one warm-up")
    for fused in (False, True):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch = random_signal(batch_size, length, device, torch.randint(0, VOCAB, (batch_size, length), device=device))
        n = len(batch.targets)
        times = []
        for step in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                student = student_forward(model, batch.input_ids, batch.attention_mask, fused)
            loss, _ = OBJECTIVES["supervised_kd"].loss(student, batch, LossSettings(divergence="jsd"), 1.0, {"completion_tokens": n})
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del student, loss
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        peak = f"peak memory {peak_bytes(device) / 2**30:.2f} GB" if device.type == "cuda" else "peak memory: on CUDA only"
        print(f"loss_head {'fused' if fused else 'logits'}: {sum(times[1:]) / steps:.3f} s/step, {peak}")
        del model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant; the fastest is shown")
    parser.add_argument("--variant", choices=VARIANTS, help="one variant alone (the CPU runs each in its own process)")
    parser.add_argument("--student-step", action="store_true", help="whole training steps of a 0.5B-shaped student")
    parser.add_argument("--layers", type=int, default=24, help="--student-step: decoder layers")
    parser.add_argument("--batch", type=int, default=BATCH, help="--student-step: sequences per step")
    parser.add_argument("--length", type=int, default=LENGTH, help="--student-step: tokens per sequence")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.student_step:
        student_step(device, args.bf16, args.layers, args.batch, args.length)
        return
    if args.variant:
        print("\t".join(f"{x:.3f}" for x in run(args.variant, device, args.bf16, args.repeats)))
        return
    print(f"{device} {'bf16 autocast' if args.bf16 else 'fp32'}: vocab {VOCAB:,}, hidden {HIDDEN}, batch × length "
          f"{BATCH} × {LENGTH}, k={K}, generalized JSD(0.5), head product + loss + backward")
    results = {}
    for variant in VARIANTS:
        if device.type == "cpu":
            command = [sys.executable, __file__, "--variant", variant, "--repeats", str(args.repeats)] + (["--bf16"] if args.bf16 else [])
            results[variant] = tuple(map(float, subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()))
        else:
            results[variant] = run(variant, device, args.bf16, args.repeats)
        seconds, temporaries, teacher = results[variant]
        print(f"{variant:6s}: {seconds:.3f} s, loss temporaries {temporaries:,.0f} MB, teacher-side tensors {teacher:,.1f} MB")
    dense, sparse, fused = (results[v] for v in VARIANTS)
    print(f"fused: {dense[1] / fused[1]:.0f}× less memory than dense, {sparse[1] / fused[1]:.0f}× less than sparse; "
          f"time {fused[0] / sparse[0]:.2f}× sparse's, {fused[0] / dense[0]:.2f}× dense's")


if __name__ == "__main__":
    main()
