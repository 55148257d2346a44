"""Resources: the teacher engine and the store, configurable in the UI and in `definitions.py`."""

from typing import Literal

import dagster as dg
from pydantic import Field

from pipelines.store import Store
from training.engines.hf import HFEngine


class TeacherEngine(dg.ConfigurableResource):
    """Which backend runs a model card's checkpoint. Assets call `load(card)` and use the `Engine`
    interface only, so other backends slot in here without touching assets."""

    backend: Literal["hf"] = Field("hf", description="'hf': transformers, in process")
    device: str = Field("cpu", description="torch device for the hf backend, e.g. 'cuda'")
    batch_size: int = Field(64, ge=1, description="sequences per forward / generate call")
    trust_remote_code: bool = Field(False, description="let from_pretrained run code shipped with the model")

    def load(self, card: dict):
        return HFEngine.load(
            card["path"],
            revision=card.get("revision"),
            trust_remote_code=self.trust_remote_code,
            batch_size=self.batch_size,
            device=self.device,
        )


class DistillStore(dg.ConfigurableResource):
    """Where datasets, checkpoints and the catalog live; empty means $DISTILL_HOME or ./.distill."""

    home: str = Field("", description="data root; empty: $DISTILL_HOME, else ./.distill")

    def open(self) -> Store:
        return Store(self.home or None)
