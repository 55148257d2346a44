"""`launcher: ray`: the same training on a Ray cluster, through Ray Train's `TorchTrainer`.

`python -m training.distill --config run.json` with `launcher: ray` becomes the Ray driver: it joins
the cluster (`ray_address`, else $RAY_ADDRESS, else a local one) and starts `processes` workers. Ray
Train sets RANK, WORLD_SIZE and LOCAL_RANK and opens the process group (gloo on CPUs, nccl with
GPUs) before each worker calls `training.distill.run`, so every worker is one rank of the same
data-parallel training as under torchrun (DDP or FSDP, `strategy`). Paths are made absolute, because
Ray workers run in their own directory; on several nodes they must be on a filesystem every node
sees. The Dagster Pipes variables are passed on, so that rank 0 reports to the asset's run.
"""

import os
from pathlib import Path

from training.distill import DistillConfig, pipes_on_rank0, run, training_device


def train_worker(config: dict) -> None:
    """One Ray Train worker: one rank of the training (the process group is already open)."""
    with pipes_on_rank0() as pipes:
        run(DistillConfig.model_validate(config), pipes)


def train_on_ray(config: DistillConfig) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    local = {name: str(Path(path).absolute()) for name, path in [("output", config.output), ("state_dir", config.state_dir)] if path}
    config = config.model_copy(update={
        **local, "data": [str(Path(p).absolute()) for p in config.data], "rollouts": [str(Path(p).absolute()) for p in config.rollouts],
        "student": str(Path(config.student).absolute()) if Path(config.student).exists() else config.student,
    })
    gpus = config.device != "cpu" and (config.device != "auto" or training_device("auto").type == "cuda")
    pipes = {name: value for name, value in os.environ.items() if name.startswith("DAGSTER_PIPES_")}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=config.ray_address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 runtime_env={"env_vars": pipes}, log_to_driver=True)
    try:
        trainer = TorchTrainer(
            train_worker, train_loop_config=config.model_dump(mode="json"),
            torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
            scaling_config=ScalingConfig(num_workers=config.processes, use_gpu=gpus),
            run_config=RunConfig(storage_path=str(Path(config.output).absolute().parent / "ray_train"),
                                 name=Path(config.output).name),
        )
        trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
