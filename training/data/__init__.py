"""Dataset building: the teacher labels prompts (labeling), writes new inputs (expansion, synthesis),
the candidates are filtered and selected (curation), the student samples and the teacher scores its
samples (rollouts); prompts come from the task, files or `datasets` (prompt_sources)."""
