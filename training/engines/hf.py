"""The in-process transformers engine: batched `generate` and teacher-forced `score`."""

import numpy as np
import torch

from training.engines.base import Generation, SamplingParams
from training.models import load_model
from training.signal import SparseSignal, topk_signal


class HFEngine:
    backend = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 64, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = device
        self.context_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length

    @classmethod
    def load(cls, name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, **kwargs):
        model, tokenizer = load_model(name_or_path, revision, trust_remote_code)
        return cls(model, tokenizer, **kwargs)

    def pad_batch(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) with pads on the left (generation) or right (scoring)."""
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)

    def check_signal(self, k: int, temperature: float) -> None:
        """The full logits are here: any k up to the vocabulary and any temperature."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, logprobs: int = 0) -> list[Generation]:
        eos = self.tokenizer.eos_token_id
        out = []
        for batch_no, start in enumerate(range(0, len(prompt_ids), self.batch_size)):
            ids, mask = self.pad_batch(prompt_ids[start : start + self.batch_size], side="left")
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
                eos_token_id=eos,
                return_dict_in_generate=True,
                output_logits=logprobs > 0,
            )
            generated = generated_out.sequences[:, ids.shape[1] :].cpu()
            is_eos = generated == eos
            has_eos = is_eos.any(dim=1)
            lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, generated.shape[1])
            signals = self._generated_signals(generated_out.logits, generated, lengths, logprobs) if logprobs else None
            for row, (tokens, length, stopped) in enumerate(zip(generated.tolist(), lengths.tolist(), has_eos.tolist())):
                completion = tokens[:length]
                out.append(
                    Generation(
                        prompt_index=start + row // params.n,
                        sample_index=row % params.n,
                        completion_ids=completion,
                        text=self.tokenizer.decode(completion, skip_special_tokens=True),
                        finish_reason="stop" if stopped else "length",
                        signal=signals[row] if signals else None,
                    )
                )
        return out

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
            prompts = prompt_ids[start : start + self.batch_size]
            completions = completion_ids[start : start + self.batch_size]
            ids, mask = self.pad_batch([p + c for p, c in zip(prompts, completions)], side="right")
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            prompt_lengths = torch.tensor([len(p) for p in prompts], device=self.device)
            completion_lengths = torch.tensor([len(c) for c in completions])
            position = torch.arange(logits.shape[1], device=self.device)
            # logits at position t predict token t+1: completion tokens are predicted from P−1 … P+C−2
            predicts_completion = (position >= prompt_lengths[:, None] - 1) & (
                position < (prompt_lengths + completion_lengths.to(self.device))[:, None] - 1
            )
            topk_ids, topk_logprobs, token_logprob, tail_mass = topk_signal(
                logits[predicts_completion], ids[:, 1:][predicts_completion], k, temperature
            )
            parts = [t.cpu().numpy() for t in (topk_ids, topk_logprobs, token_logprob, tail_mass)]
            splits = completion_lengths.cumsum(0)[:-1].numpy()
            for pieces in zip(*(np.split(part, splits) for part in parts)):
                signals.append(SparseSignal(*pieces))
        return signals
