"""Models as files: loading and saving checkpoints and their hashes, tokenizers, chat templates (a
prompt as each model sees it), and the padded token batches every forward pass takes."""
