"""Evaluation: exact match and the task-free metrics (reverse KL on own samples, teacher NLL)."""
