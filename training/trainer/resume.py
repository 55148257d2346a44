"""Resumable training: every `checkpoint_every` steps the whole training state is written, so that a
training killed at any point continues from its last checkpoint along the same curve. No pickle:

    <directory>/step-<n>/model.safetensors       the weights, whole (gathered from the shards under FSDP)
    <directory>/step-<n>/optimizer.safetensors   AdamW's moments and step counts, by parameter name
    <directory>/step-<n>/random.safetensors      the global RNG, the λ coin, the data shuffles' generators
    <directory>/step-<n>/state.json              step, data positions, optimizer groups, curve
    <directory>/latest.json                      the last complete checkpoint and the run's fingerprint

A checkpoint is written whole before latest.json names it (os.replace), so a kill while writing
leaves the previous one in force. A checkpoint of another run (its `fingerprint`: settings and
inputs) is ignored: changed settings or data start afresh.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.trainer import parallel
from training.trainer.shuffle import ShuffledBatches


def save_state(directory: Path, fingerprint: str, step: int, model, optimizer, coin: torch.Generator,
               streams: dict, curve: list[dict]) -> None:
    """Writes the state after `step` as step-<step>/, names it in latest.json, removes older ones.
    Every rank calls it (the state is gathered from all under FSDP); rank 0 writes."""
    model_state, optimizer_state = parallel.full_state(model, optimizer)
    if not parallel.is_writer():
        return
    final = directory / f"step-{step}"
    partial = directory / f".step-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(stored_once(model_state), str(partial / "model.safetensors"))
    save_file({f"{name}/{moment}": value for name, moments in optimizer_state["state"].items() for moment, value in moments.items()},
              str(partial / "optimizer.safetensors"))
    shuffled = {name: batches.state() for name, batches in streams.items()
                if isinstance(batches, ShuffledBatches) and batches.windows is not None}
    save_file({"torch": torch.get_rng_state(), "coin": coin.get_state(),
               **{f"{name}.{key}": value for name, (_, tensors) in shuffled.items() for key, value in tensors.items()}},
              str(partial / "random.safetensors"))
    (partial / "state.json").write_text(json.dumps({
        "step": step, "positions": {name: position for name, (position, _) in shuffled.items()},
        "param_groups": optimizer_state["param_groups"], "curve": curve,
    }))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    pointer = directory / ".latest.json.tmp"
    pointer.write_text(json.dumps({"checkpoint": final.name, "fingerprint": fingerprint, "step": step}))
    os.replace(pointer, directory / "latest.json")
    for older in directory.glob("step-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)


def stored_once(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without the names that alias an earlier one (tied weights: the output layer is the
    embedding), which safetensors refuses; loading fills them through the tie."""
    first_name: dict[int, str] = {}
    return {name: tensor for name, tensor in state.items() if first_name.setdefault(tensor.data_ptr(), name) == name}


def load_state(directory: Path | None, fingerprint: str, model, optimizer, coin: torch.Generator,
               streams: dict) -> tuple[int, list[dict]] | None:
    """Restores the last checkpoint of this run (same fingerprint) into model, optimizer, coin and
    streams; returns (its step, the curve so far), or None when there is none to resume."""
    latest = directory / "latest.json" if directory else None
    if latest is None or not latest.exists():
        return None
    pointer = json.loads(latest.read_text())
    if pointer["fingerprint"] != fingerprint:
        return None
    checkpoint = directory / pointer["checkpoint"]
    state = json.loads((checkpoint / "state.json").read_text())
    moments: dict[str, dict] = {}
    for key, value in load_file(str(checkpoint / "optimizer.safetensors")).items():
        name, moment = key.rsplit("/", 1)
        moments.setdefault(name, {})[moment] = value
    parallel.load_full_state(model, optimizer, load_file(str(checkpoint / "model.safetensors")),
                             {"state": moments, "param_groups": state["param_groups"]})
    random = load_file(str(checkpoint / "random.safetensors"))
    torch.set_rng_state(random["torch"])
    coin.set_state(random["coin"])
    for name, position in state["positions"].items():
        streams[name].restore(position, {key.split(".", 1)[1]: value for key, value in random.items() if key.startswith(f"{name}.")})
    return state["step"], state["curve"]
