"""`launcher: ray`: the same training on a Ray cluster, through Ray Train's `TorchTrainer`.

`python -m training.launch --config run.json` with `launch: {launcher: ray}` becomes the Ray driver: it joins
the cluster (`ray_address`, else $RAY_ADDRESS, else a local one) and starts `processes` workers. Ray
Train sets RANK, WORLD_SIZE and LOCAL_RANK and opens the process group (gloo on CPUs, nccl with
GPUs) before each worker calls `training.distill.run`, so every worker is one rank of the same
data-parallel training as under torchrun (DDP or FSDP, `strategy`). Paths are made absolute, because
Ray workers run in their own directory; on several nodes they must be on a filesystem every node
sees. With `device: auto` the driver's machine decides between GPUs and CPUs; set `device: cuda`
when only the workers have GPUs.

Rank 0's reports (progress lines, the final weights hash) travel through a Ray queue to the driver,
which runs beside the asset that launched it and passes them on to its Dagster Pipes session: a
worker on another node could not reach the session's message file.
"""

import os
import threading
from pathlib import Path
from queue import Empty

from training.launch.command import DistillCommand, run
from training.launch.report import Reporter, reporter_for_this_process
from training.trainer.loop import training_device


def train_worker(arguments: dict) -> None:
    """One Ray Train worker: one rank of the training (the process group is already open); its
    reports go on the driver's queue."""
    reports = arguments["reports"]
    run(DistillCommand.model_validate(arguments["config"]),
        Reporter(lambda line: reports.put(("line", line)), lambda message: reports.put(("message", message))))


def pass_on(reports, reporter: Reporter, stop: threading.Event) -> None:
    """The driver's side: rank 0's reports into the driver's own reporter (Pipes or stdout), until `stop`."""
    while True:
        try:
            kind, value = reports.get(timeout=0.2)
        except Empty:
            if stop.is_set():
                return
            continue
        getattr(reporter, kind)(value)


def train_on_ray(config: DistillCommand) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    local = {name: str(Path(path).absolute()) for name, path in [("output", config.output), ("state_dir", config.state_dir)] if path}
    config = config.model_copy(update={
        **local, "data": [str(Path(p).absolute()) for p in config.data], "rollouts": [str(Path(p).absolute()) for p in config.rollouts],
        "student": str(Path(config.student).absolute()) if Path(config.student).exists() else config.student,
    })
    gpus = config.device != "cpu" and (config.device != "auto" or training_device("auto").type == "cuda")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=config.launch.ray_address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    stop = threading.Event()
    try:
        with reporter_for_this_process() as reporter:
            reports = Queue(actor_options={"num_cpus": 0})
            relay = threading.Thread(target=pass_on, args=(reports, reporter, stop))
            relay.start()
            try:
                TorchTrainer(
                    train_worker, train_loop_config={"config": config.model_dump(mode="json"), "reports": reports},
                    torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
                    scaling_config=ScalingConfig(num_workers=config.launch.processes, use_gpu=gpus),
                    run_config=RunConfig(storage_path=str(Path(config.output).parent / "ray_train"), name=Path(config.output).name),
                ).fit()
            finally:
                stop.set()
                relay.join()
    finally:
        if started_here:
            ray.shutdown()
