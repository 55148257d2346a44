"""Data-parallel training under torchrun (`torchrun --nproc-per-node N -m training.trainer.loop --config
run.json`): one process per device, each taking its share of every global batch.

Every rank draws the same global batch B (same seeds) and runs forward and backward on its own
contiguous slice B_r. With N the completion tokens of all of B, rank r's loss is

    L_r = world · Σ_{t ∈ B_r} ℓ_t / N

and DistributedDataParallel averages gradients over ranks, so the step follows ∇ Σ_{t ∈ B} ℓ_t / N:
the gradient of one process on all of B, whatever the number of processes or micro-batches.

Strategies: `ddp` keeps a whole copy of the model on every rank and all-reduces gradients; `fsdp`
(FSDP2, `fully_shard` on each decoder layer, then on the whole model) splits parameters, gradients
and optimizer state over the ranks, for students that do not fit one device. Both average gradients
over ranks, so the loss above holds for both. Rank 0 writes the checkpoint, the curve and the
resumable state, from the whole state gathered from every rank (`full_state`).
"""

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def start_process_group(device_name: str) -> None:
    """Joins the torchrun job (gloo on the CPU, nccl on CUDA) when launched by torchrun with more than
    one process; a plain `python -m training.trainer.loop` stays a single process."""
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


def wrap(model, strategy: str = "ddp"):
    """The model as it trains across the ranks: DistributedDataParallel, or sharded in place with
    FSDP2 (each of the model's `_no_split_modules` layers, then the whole); alone, itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if strategy == "fsdp":
        layers = set(getattr(model, "_no_split_modules", None) or [])
        for module in [m for m in model.modules() if type(m).__name__ in layers]:
            fully_shard(module)
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def rank_slice(rows: int) -> tuple[int, int]:
    """(start, length) of this rank's contiguous share of a global batch of `rows` rows."""
    rank, size = world()
    start, end = rank * rows // size, (rank + 1) * rows // size
    return start, end - start


def no_sync(model, last: bool):
    """Skips the gradient all-reduce (DDP) or reduce-scatter (FSDP) for every micro-batch but the last."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return nullcontext()


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """(model state, optimizer state) whole, by parameter name, on rank 0's CPU (empty on the other
    ranks): gathered from the shards under FSDP, copied otherwise. Every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)


def gathered_weights(model) -> dict | None:
    """Under FSDP, the whole weights on rank 0 (every rank must call it); else None: the model holds them."""
    return full_state(model)[0] if isinstance(model, FSDPModule) else None


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Loads whole states (as `full_state` gives them) into the model and optimizer, each rank
    keeping its shard under FSDP; tied weights may be stored once."""
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))


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
