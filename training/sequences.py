"""Token sequences for training: prompt ⊕ completion ⊕ <eos>, right-padded, with a completion mask."""

import torch


def encode_completions(tokenizer, prompts: list[str], completions: list[str], max_length: int):
    """Returns (input_ids, attention_mask, completion_mask), each (batch, length).

    completion_mask[b, t] is 1 where token t belongs to the completion (incl. <eos>): the positions a
    loss is averaged over. Sequences longer than `max_length` raise, naming the longest.
    """
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    rows = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompt_ids, completion_ids)]
    length = max(len(r) for r in rows)
    if length > max_length:
        raise ValueError(f"a sequence has {length} tokens, more than max_length={max_length}; raise max_length")
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), length), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, prompt) in enumerate(zip(rows, prompt_ids)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, len(prompt) : len(row)] = 1
    return input_ids, attention_mask, completion_mask

