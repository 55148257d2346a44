"""The trainer: divergences and losses on the sparse signal, the objectives, the one training loop,
and what it needs (optimizer, streaming of stored batches, resume, data parallel, LoRA). Plain torch."""
