"""The ML library: tasks, tokenizers, models, the sparse teacher signal, engines, training.

Never imports dagster, so that training runs as a plain command too.
"""
