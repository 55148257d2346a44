"""The records every room shares: the sparse teacher signal (columns, codec, statistics, validity),
the table helpers (content-hash ids, constant columns, prompt columns carried onto generated rows) and
the model card."""
