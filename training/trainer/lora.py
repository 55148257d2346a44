"""LoRA for large students (Hu et al. 2021, through peft): each targeted linear layer W becomes

    h = W x + (α / r) · B A x,      A: r × d_in (random),  B: d_out × r (zero at the start)

and only A and B train, so the optimizer state and the gradients are those of r·(d_in + d_out)
parameters per layer instead of d_in·d_out. The trained adapter is saved on its own, and, with
`merge`, merged into W (W + (α / r)·B A) as an ordinary checkpoint that evaluation, the rounds and
vLLM load like any other.
"""

from pathlib import Path

import torch
from pydantic import BaseModel, Field

from training.models.checkpoints import save_model


class LoraSettings(BaseModel):
    r: int = Field(16, ge=1, description="rank of the update B·A")
    alpha: float = Field(32.0, gt=0, description="scale: the update is (alpha / r)·B·A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(["all-linear"], description="names of the linear layers to adapt (e.g. q_proj, v_proj); "
                                      "'all-linear': every linear layer but the output head")
    merge: bool = Field(True, description="also write the student with the adapter merged in, as a whole checkpoint")


def with_lora(model, settings: LoraSettings, seed: int, gradient_checkpointing: bool = False):
    """The model with LoRA adapters on its target layers (A drawn from `seed`), everything else frozen (a peft model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = "all-linear" if settings.target_modules == ["all-linear"] else settings.target_modules
    adapted = get_peft_model(model, LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                               target_modules=targets, task_type="CAUSAL_LM"))
    if gradient_checkpointing:  # checkpointed layers see frozen inputs: make them carry gradients to the adapters
        adapted.enable_input_require_grads()
    return adapted


def save_lora(model, tokenizer, output: Path, merge: bool):
    """Writes the adapter to output/adapter (adapter_model.safetensors, adapter_config.json) and, with
    `merge`, the merged student to output; returns what was written as the student (merged or adapted)."""
    model.save_pretrained(output / "adapter")
    tokenizer.save_pretrained(output / "adapter")
    if not merge:
        return model
    merged = model.merge_and_unload()
    save_model(merged, tokenizer, output)
    return merged
