"""How the training command is started: how many processes, by what, and how they share the model.
The loop's own settings are `TrainingSettings` (training/trainer/settings.py)."""

from typing import Literal

from pydantic import BaseModel, Field, model_validator


class LaunchSettings(BaseModel):
    launcher: Literal["process", "torchrun", "ray"] = Field(
        "process", description="'process', one process; 'torchrun', `torchrun --standalone --nproc-per-node <processes>` on "
        "this node; 'ray', <processes> Ray Train workers on a Ray cluster (training/launch/ray_train.py)"
    )
    processes: int = Field(1, ge=1, description="training processes (launcher torchrun or ray): one per GPU, or gloo "
                           "processes on CPUs; each takes its share of every batch (DDP or FSDP, see `strategy`)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with processes > 1: 'ddp', a whole model per process; 'fsdp' (FSDP2), parameters, gradients "
        "and optimizer state sharded over the processes, for students that do not fit one device"
    )
    ray_address: str = Field("", description="launcher ray: the cluster to join ('auto', 'ray://host:10001'); empty: "
                             "$RAY_ADDRESS, else a local cluster")

    @model_validator(mode="after")
    def _launcher_for_processes(self):
        if self.processes > 1 and self.launcher == "process":
            raise ValueError(f"processes={self.processes} needs a launcher that starts them: set launcher 'torchrun' "
                             "(this node) or 'ray' (a Ray cluster), or processes 1")
        return self
