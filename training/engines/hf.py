"""The in-process transformers engine: batched `generate` and teacher-forced `score`."""

import numpy as np
import pyarrow as pa
import torch

from training.engines.base import Generation, stop_string_end
from training.engines.sampling import Sampling
from training.models.batches import completion_positions, left_padded, list_lengths
from training.models.checkpoints import end_of_turn_ids, load_model
from training.schema.signal import SparseSignal, topk_signal


class HFEngine:
    backend = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 64, device: str | None = None):
        """`device`: where the model runs; None leaves it where it is (a student being trained)."""
        self.model = (model.to(device) if device else model).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.context_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.end_of_turn_ids = end_of_turn_ids(model.generation_config, tokenizer)

    @classmethod
    def load(cls, name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, **kwargs):
        model, tokenizer = load_model(name_or_path, revision, trust_remote_code)
        return cls(model, tokenizer, **kwargs)

    def check_signal(self, k: int, temperature: float) -> None:
        """The full logits are here: any k up to the vocabulary and any temperature."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: Sampling, logprobs: int = 0) -> list[Generation]:
        out = []
        for batch_no, start in enumerate(range(0, len(prompt_ids), self.batch_size)):
            ids, mask = (t.to(self.device) for t in left_padded(prompt_ids[start : start + self.batch_size], self.tokenizer.pad_token_id))
            torch.manual_seed(params.seed * 1_000_003 + batch_no)
            sampled = params.temperature > 0
            generated_out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=sampled,
                temperature=params.temperature if sampled else None,
                top_p=params.top_p if sampled else None,
                top_k=0 if sampled else None,
                num_return_sequences=params.n,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.end_of_turn_ids,
                stop_strings=list(params.stop) or None,
                tokenizer=self.tokenizer if params.stop else None,
                return_dict_in_generate=True,
                output_logits=logprobs > 0,
            )
            generated = generated_out.sequences[:, ids.shape[1] :].cpu()
            lengths, stopped = self._completion_lengths(generated, params.stop)
            signals = self._generated_signals(generated_out.logits, generated, lengths, logprobs) if logprobs else None
            for row, (tokens, length, ended) in enumerate(zip(generated.tolist(), lengths.tolist(), stopped.tolist())):
                completion = tokens[:length]
                out.append(
                    Generation(
                        prompt_index=start + row // params.n,
                        sample_index=row % params.n,
                        completion_ids=completion,
                        text=self.tokenizer.decode(completion, skip_special_tokens=True),
                        finish_reason="stop" if ended else "length",
                        signal=signals[row] if signals else None,
                    )
                )
        return out

    def _completion_lengths(self, generated: torch.Tensor, stop: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens per completion, whether it stopped): up to and including its first end-of-turn id,
        or the token that completes a stop string if that comes first (the rest is padding)."""
        is_end = torch.isin(generated, torch.tensor(self.end_of_turn_ids))
        stopped = is_end.any(dim=1)
        lengths = torch.where(stopped, is_end.int().argmax(dim=1) + 1, generated.shape[1])
        if stop:
            for row, tokens in enumerate(generated.tolist()):
                end = stop_string_end(self.tokenizer, tokens[: lengths[row]], stop)
                if end is not None:
                    lengths[row], stopped[row] = end, True
        return lengths, stopped

    @staticmethod
    def _generated_signals(step_logits, generated: torch.Tensor, lengths: torch.Tensor, k: int) -> list[SparseSignal]:
        """The top-k signal of each generated row from generate's raw per-step logits, step by step
        (never a (rows, steps, vocab) tensor)."""
        steps = [topk_signal(logits.cpu(), generated[:, t], k) for t, logits in enumerate(step_logits)]
        topk_ids, topk_logprobs, token_logprob, tail = (torch.stack(part, dim=1).numpy() for part in zip(*steps))
        return [
            SparseSignal(topk_ids[r, :n], topk_logprobs[r, :n], token_logprob[r, :n], tail[r, :n])
            for r, n in enumerate(lengths.tolist())
        ]

    @torch.no_grad()
    def score(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]], k: int, temperature: float = 1.0
    ) -> list[SparseSignal]:
        signals = []
        for start in range(0, len(prompt_ids), self.batch_size):
            prompts = pa.array(prompt_ids[start : start + self.batch_size], pa.list_(pa.int64()))
            completions = pa.array(completion_ids[start : start + self.batch_size], pa.list_(pa.int64()))
            ids, mask, rows, positions, targets = completion_positions(prompts, completions, self.tokenizer.pad_token_id)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            signal = topk_signal(logits[rows, positions], targets.to(self.device), k, temperature)
            parts = [t.cpu().numpy() for t in signal]
            splits = np.cumsum(list_lengths(completions))[:-1]
            signals += [SparseSignal(*pieces) for pieces in zip(*(np.split(part, splits) for part in parts))]
        return signals
