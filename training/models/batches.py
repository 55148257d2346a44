"""Padded token batches: the one place they are built, with array indexing (no loop over tokens).

    completion_positions   prompt ⊕ completion, right-padded, and the logits position that predicts
                           each completion token: training losses and teacher-forced scoring
    left_padded            prompts alone, left-padded, so that generation continues every row at once
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


def flat_values(column: pa.ChunkedArray | pa.Array, depth: int) -> np.ndarray:
    """The values of a list column (depth 1) or list-of-lists column (depth 2) as one numpy array."""
    for _ in range(depth):
        column = pc.list_flatten(column)
    return column.to_numpy(zero_copy_only=False)


def list_lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _ranks(lengths: np.ndarray) -> np.ndarray:
    """0, 1, …, n_b − 1 for every b, concatenated."""
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def completion_positions(prompt_ids: pa.Array | pa.ChunkedArray, completion_ids: pa.Array | pa.ChunkedArray, pad_token_id: int):
    """(input_ids, attention_mask, rows, positions, targets) for prompt ⊕ completion sequences.

    input_ids are right-padded (B, L); completion token i of sequence b is predicted by the logits
    at (b, prompt_length_b + i − 1), so `logits[rows, positions]` are the N completion predictions.
    """
    prompt_lengths, completion_lengths = list_lengths(prompt_ids), list_lengths(completion_ids)
    lengths = prompt_lengths + completion_lengths
    batch = len(lengths)
    row_of_token = torch.from_numpy(np.repeat(np.arange(batch), lengths))
    column_of_token = _ranks(lengths)
    is_prompt = torch.from_numpy(column_of_token < np.repeat(prompt_lengths, lengths))
    values = torch.empty(int(lengths.sum()), dtype=torch.long)
    values[is_prompt] = torch.from_numpy(flat_values(prompt_ids, 1).astype(np.int64))
    targets = torch.from_numpy(flat_values(completion_ids, 1).astype(np.int64))
    values[~is_prompt] = targets
    input_ids = torch.full((batch, int(lengths.max())), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    column = torch.from_numpy(column_of_token)
    input_ids[row_of_token, column] = values
    attention_mask[row_of_token, column] = 1
    completion_rows = torch.from_numpy(np.repeat(np.arange(batch), completion_lengths))
    positions = torch.from_numpy(np.repeat(prompt_lengths, completion_lengths) + _ranks(completion_lengths) - 1)
    return input_ids, attention_mask, completion_rows, positions, targets


def left_padded(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts with the pads on the left."""
    column = pa.array(prompt_ids, pa.list_(pa.int64()))
    lengths = list_lengths(column)
    width = int(lengths.max())
    rows = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
    columns = torch.from_numpy(np.repeat(width - lengths, lengths) + _ranks(lengths))
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    input_ids[rows, columns] = torch.from_numpy(flat_values(column, 1).astype(np.int64))
    attention_mask[rows, columns] = 1
    return input_ids, attention_mask
