"""Data-parallel training under torchrun (`torchrun --nproc-per-node N -m training.distill --config
run.json`): one process per device, each taking its share of every global batch.

Every rank draws the same global batch B (same seeds) and runs forward and backward on its own
contiguous slice B_r. With N the completion tokens of all of B, rank r's loss is

    L_r = world · Σ_{t ∈ B_r} ℓ_t / N

and DistributedDataParallel averages gradients over ranks, so the step follows ∇ Σ_{t ∈ B} ℓ_t / N:
the gradient of one process on all of B, whatever the number of processes or micro-batches.
Rank 0 writes the checkpoint, the curve and the resumable state.
"""

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def start_process_group(device_name: str) -> None:
    """Joins the torchrun job (gloo on the CPU, nccl on CUDA) when launched by torchrun with more than
    one process; a plain `python -m training.distill` stays a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA, each process its own GPU (LOCAL_RANK)."""
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model):
    """The model as it trains: DistributedDataParallel across the ranks, else itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def rank_slice(rows: int) -> tuple[int, int]:
    """(start, length) of this rank's contiguous share of a global batch of `rows` rows."""
    rank, size = world()
    start, end = rank * rows // size, (rank + 1) * rows // size
    return start, end - start


def no_sync(model, last: bool):
    """Skips the gradient all-reduce for every micro-batch but the last (DDP), a no-op otherwise."""
    return model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last else nullcontext()


def summed(values: list[float]) -> list[float]:
    """Each value summed over the ranks."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def is_writer() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
