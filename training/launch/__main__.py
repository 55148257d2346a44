"""`python -m training.launch --config run.json`: the training command (training/launch/command.py)."""

import argparse
from pathlib import Path

from training.launch.command import DistillCommand, run
from training.launch.ray_train import train_on_ray
from training.launch.report import reporter_for_this_process

parser = argparse.ArgumentParser(prog="python -m training.launch", description="Trains a student as run.json says.")
parser.add_argument("--config", required=True, help="JSON file with DistillCommand fields (training/launch/command.py)")
config = DistillCommand.model_validate_json(Path(parser.parse_args().config).read_text())
if config.launch.launcher == "ray":
    train_on_ray(config)
else:
    with reporter_for_this_process() as reporter:
        run(config, reporter)
