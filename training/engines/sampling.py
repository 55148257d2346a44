"""How completions are sampled: one `Sampling` settings model, composed by every setting that samples
(labeling, writing inputs, rollouts, online rounds, evals), each stating its own defaults there, and
`derived_seed`, the one rule for the seeds of a round and of its shards or steps."""

import json

from pydantic import BaseModel, ConfigDict, Field, model_validator


def derived_seed(seed: int, round_number: int = 0, part: int = 0) -> int:
    """A round's seed, and within it a shard's or a step's: seed · 1000 + round_number + part
    (at seed 0, round r's shard or step s samples with seed r + s)."""
    return seed * 1000 + round_number + part


class Sampling(BaseModel):
    """How completions are sampled. A completion ends at any of the model's end-of-turn ids (kept as
    its last token) or once its text contains a `stop` string (the token that completes it kept)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, description="completions per prompt")
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with this much probability")
    max_new_tokens: int = Field(64, ge=1, description="the most tokens a completion may have")
    seed: int = Field(0, description="the random seed (per shard, round or step: derived_seed)")
    stop: list[str] = Field([], description="strings that end a completion (besides the model's end-of-turn ids), kept in it")

    @model_validator(mode="after")
    def _samples_differ(self):
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n={self.n} greedy responses would all be the same: set temperature > 0 or n = 1")
        return self

    def derived(self, round_number: int = 0, part: int = 0) -> "Sampling":
        """This sampling with the seed of round `round_number`'s shard or step `part` (`derived_seed`)."""
        return Sampling(**{**self.model_dump(), "seed": derived_seed(self.seed, round_number, part)})

    def as_json(self) -> str:
        """The sampling as JSON, for `sampling` columns and sample ids; `stop` only when set, so the ids
        of rows sampled without stop strings do not change with it."""
        fields = {name: value for name, value in self.model_dump().items() if name != "stop" or value}
        return json.dumps(fields, sort_keys=True)
