"""The launch: the training as a plain command, started in one process, under torchrun or on Ray
Train, reporting its progress to stdout or to a Dagster Pipes session."""
