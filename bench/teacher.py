"""Trains the embedded teacher as `teacher_model` does and prints time and eval exact match.

    .venv/bin/python bench/teacher.py [steps]
"""

import sys

import torch

from training.embedded import train_embedded
from training.models import STUDENT_ARCHITECTURE, TEACHER_ARCHITECTURE
from training.distill import TrainingSettings


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 700
    print(f"torch threads: {torch.get_num_threads()}")
    settings = TrainingSettings(objective="sft", steps=steps, batch_size=80, learning_rate=3e-3, warmup_steps=50)  # teacher_model's
    for name, architecture in [("teacher", TEACHER_ARCHITECTURE), ("student alone", STUDENT_ARCHITECTURE)]:
        model, tokenizer, curve, accuracy, seconds = train_embedded(architecture, settings, eval_problems=1000, instruction_share=0.2)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name:14s} params {params:>9,}  steps {steps}  final loss {curve[-1]['loss']:.4f}  "
            f"train+eval {seconds:.0f} s  greedy exact match (1000 eval problems) {accuracy:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
