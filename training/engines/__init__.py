"""Inference backends behind one interface (`base.Engine`): transformers in-process (`hf`)."""
