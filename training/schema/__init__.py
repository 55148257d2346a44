"""The records every room shares: the sparse teacher signal (columns, codec, statistics, validity)
and the table helpers (content-hash ids, constant columns, prompt columns carried onto generated rows)."""
