"""The student's forward for a loss: its logits, or its last hidden states and output head.

A causal LM ends in logits z = h · Wᵀ over the whole vocabulary at every position: (B, L, V) floats,
and as many again for their gradient (4 × 512 × 151,936 in fp32: 1.2 GB each). The token losses
(training/trainer/losses.py) need z only at the completion positions, a chunk at a time, so with
`loss_head` 'fused' the model runs with its head skipped and the loss takes h and W instead
(`HiddenStates`): neither the (B, L, V) logits nor their gradient are ever made.

The head's input is taken by a forward pre-hook on the model's output embeddings, which hands the
head an empty sequence instead (its output is (B, 0, V)): the head still runs inside the model's own
forward, so DDP and FSDP2 see its weight used and synchronize its gradient as usual, and under FSDP2
the weight the loss takes is the gathered one, which the root module keeps until backward. The loss
multiplies in the dtype the head would have (bf16 under the forward's autocast), wherever it runs.

It applies where the logits are exactly h · Wᵀ: a plain `torch.nn.Linear` head without bias, and no
scaling or capping of the logits after it. Elsewhere (LoRA on the head, a bias, Gemma's soft-capping,
Cohere's logit_scale, Granite's logits_scaling) the loss takes the logits: `loss_head` 'auto' says
why and goes on; 'fused' refuses.
"""

import warnings

import torch

from training.trainer.losses import HiddenStates

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _unwrapped(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def unfused_reason(model) -> str | None:
    """Why the loss cannot take this model's hidden states and head; None when it can."""
    inner = _unwrapped(model)
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its output head is a {type(head).__module__}.{type(head).__qualname__}, not a plain torch Linear (LoRA on the head?)"
    if head.bias is not None:
        return "its output head has a bias"
    config = inner.config
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None) or getattr(config.get_text_config(), name, None)
        if value not in (None, 1, 1.0):
            return f"its config transforms the logits after the head ({name} = {value})"
    return None


def fuses(loss_head: str, model, takes_hidden: bool) -> bool:
    """Whether the loss takes hidden states: `loss_head` 'fused' or 'auto', where the objective's loss
    takes them and the model's head allows it. 'fused' where it cannot is an error, before training."""
    if loss_head == "fused" and not takes_hidden:
        raise ValueError("loss_head 'fused' applies to the token objectives (sft, supervised_kd, gkd_rl, kl_advantage); "
                         "the ranking objectives take the logits: set loss_head 'auto' or 'logits'")
    if loss_head == "logits" or not takes_hidden:
        return False
    reason = unfused_reason(model)
    if reason is None:
        return True
    if loss_head == "fused":
        raise ValueError(f"loss_head 'fused' needs the logits to be hidden · headᵀ, and for this student {reason}: "
                         "set loss_head 'auto' or 'logits'")
    warnings.warn(f"the loss builds the student's logits: {reason}", stacklevel=2)
    return False


def student_forward(model, input_ids, attention_mask, fused: bool) -> torch.Tensor | HiddenStates:
    """The model's logits (B, L, V), or with `fused` its `HiddenStates` (the head run on nothing)."""
    if not fused:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    kept = {}

    def keep_head_input(head, args):
        device = args[0].device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else args[0].dtype
        kept.update(hidden=args[0], head=head.weight, product_dtype=dtype)
        return (args[0][..., :0, :], *args[1:])

    handle = _unwrapped(model).get_output_embeddings().register_forward_pre_hook(keep_head_input)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return HiddenStates(**kept)
