"""Where a training reports: rank 0's progress every REPORT_EVERY steps and, at the end, what it
saved (its weights hash), as lines and one message. The same `Reporter` writes to stdout, to a
Dagster Pipes session (when an asset launched the command: `dagster_pipes`, Dagster's dependency-free
child side, is the one adapter), or to the Ray driver's queue (training/launch/ray_train.py)."""

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

from training.trainer import parallel

REPORT_EVERY = 50  # steps between progress lines


@dataclass
class Reporter:
    line: Callable[[str], None]
    message: Callable[[dict], None]

    def progress(self, record: dict, steps: int) -> None:
        step = record["step"]
        if (step % REPORT_EVERY == 0 or step + 1 == steps) and parallel.is_writer():
            self.line(f"step {step}/{steps} loss {record['loss']:.4f}")

    def result(self, steps: int, final_loss: float, weights_hash: str) -> None:
        self.line(f"trained {steps} steps, final loss {final_loss:.4f}, weights {weights_hash}")
        self.message({"weights_hash": weights_hash, "final_loss": final_loss})


def printed() -> Reporter:
    return Reporter(lambda line: print(line, flush=True), lambda message: print(json.dumps(message), flush=True))


@contextmanager
def reporter_for_this_process():
    """To the Dagster run through Pipes when an asset launched this process and it is rank 0 (torchrun
    and Ray Train set RANK; one writer per session), else to stdout."""
    if DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ and int(os.environ.get("RANK", "0")) == 0:
        with open_dagster_pipes() as pipes:
            yield Reporter(pipes.log.info, pipes.report_custom_message)
    else:
        yield printed()
