"""Training throughput and memory (issue 14): completion tokens/s of `python -m training.trainer.loop`
with 1 process, under `torchrun --nproc-per-node 2` (DDP and FSDP2 on gloo, the same global batch),
with gradient checkpointing and with LoRA (r 16 on every linear layer), and peak RSS per process,
for the embedded student and a ~50M-parameter Llama built locally, on synthetic sparse teacher signal
(top-20 per token). Each run is a fresh process (peak RSS belongs to it alone); tokens/s leaves out
the first step (warm-up).

    .venv/bin/python bench/training_throughput.py [--steps 6]

(Not bench/training.py: a module of that name in bench/ would shadow the `training` package for the
other benchmarks, which run with bench/ first on sys.path.)
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.models.checkpoints import STUDENT_ARCHITECTURE, Architecture, build_embedded, save_model  # noqa: E402

K = 20
ARMS = {  # name → settings
    "1 process": {},
    "2 processes, DDP": {"launch": {"processes": 2, "launcher": "torchrun"}},
    "2 processes, FSDP2": {"launch": {"processes": 2, "launcher": "torchrun", "strategy": "fsdp"}},
    "1 process, gradient checkpointing": {"gradient_checkpointing": True},
    "1 process, LoRA r 16": {"lora": {"r": 16}},
}
STUDENTS = {  # name → (architecture, prompt tokens, completion tokens, sequences per batch)
    "embedded student": (STUDENT_ARCHITECTURE, 16, 96, 32),
    "~50M Llama": (Architecture(hidden_size=640, num_hidden_layers=10, num_attention_heads=10, intermediate_size=1792,
                                max_position_embeddings=512), 64, 192, 8),
}
CHILD = """
import json, resource, sys
from pathlib import Path
from training.launch.command import DistillCommand, run
from training.launch.report import printed
from training.trainer import parallel
config = DistillCommand.model_validate_json(Path(sys.argv[1]).read_text())
run(config, printed())
rank, _ = parallel.world()
print(json.dumps({"rank": rank, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
"""


def signal_rows(n: int, prompt: int, completion: int, vocab: int, seed: int = 0) -> pa.Table:
    """n rows of random tokens with a random sorted top-K teacher signal on every completion token."""
    rng = np.random.default_rng(seed)
    topk = np.sort(np.log(rng.dirichlet(np.ones(K + 1), size=(n, completion))[..., :K]), axis=-1)[..., ::-1].astype(np.float32)
    ids = rng.integers(4, vocab, size=(n, completion, K), dtype=np.int32)
    return pa.table({
        "prompt_token_ids": pa.array(list(rng.integers(4, vocab, size=(n, prompt), dtype=np.int32)), pa.list_(pa.int32())),
        "completion_token_ids": pa.array(list(ids[..., 0]), pa.list_(pa.int32())),
        "k": pa.array([K] * n, pa.int32()),
        "temperature": pa.array([1.0] * n, pa.float32()),
        "topk_ids": pa.array([list(row) for row in ids], pa.list_(pa.list_(pa.int32()))),
        "topk_logprobs": pa.array([list(row) for row in topk], pa.list_(pa.list_(pa.float32()))),
        "token_logprob": pa.array(list(topk[..., 0]), pa.list_(pa.float32())),
        "tail_mass": pa.array(list(1 - np.exp(topk).sum(-1)), pa.list_(pa.float32())),
    })


def train(directory: Path, name: str, arm: dict, steps: int, batch_size: int) -> dict:
    config = {"student": str(directory / "student"), "data": [str(directory / "data.parquet")], "output": str(directory / name),
              "steps": steps, "batch_size": batch_size, "warmup_steps": 0, "device": "cpu", **arm}
    (directory / f"{name}.json").write_text(json.dumps(config))
    processes = arm.get("launch", {}).get("processes", 1)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    done = subprocess.run([*launcher, str(directory / "child.py"), str(directory / f"{name}.json")], capture_output=True, text=True,
                          env=environment)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    ranks = [json.loads(line) for line in re.findall(r'\{"rank"[^}]*\}', done.stdout)]  # ranks' lines may interleave
    curve = json.loads((directory / name / "curve.json").read_text())
    seconds = curve[-1]["seconds"] - curve[0]["seconds"]
    return {"tokens_per_s": sum(c["completion_tokens"] for c in curve[1:]) / seconds,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "final_loss": curve[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, {args.steps} steps, top-{K} signal, fp32 on the CPU")
    for student, (architecture, prompt, completion, batch_size) in STUDENTS.items():
        with tempfile.TemporaryDirectory() as directory:
            directory = Path(directory)
            (directory / "child.py").write_text(CHILD)
            model, tokenizer = build_embedded(architecture, seed=0)
            save_model(model, tokenizer, directory / "student")
            parameters = sum(p.numel() for p in model.parameters())
            pq.write_table(signal_rows(args.steps * batch_size, prompt, completion, len(tokenizer)), directory / "data.parquet")
            print(f"\n{student}: {parameters / 1e6:.1f}M parameters, batches of {batch_size} × ({prompt} prompt + {completion} "
                  "completion tokens)")
            for index, (arm, settings) in enumerate(ARMS.items()):
                figures = train(directory, f"arm{index}", settings, args.steps, batch_size)
                print(f"  {arm:<34} {figures['tokens_per_s']:>8,.0f} completion tokens/s, peak RSS {figures['peak_rss_mib']:>6,.0f} MiB "
                      f"per process, final loss {figures['final_loss']:.4f}")


if __name__ == "__main__":
    main()
