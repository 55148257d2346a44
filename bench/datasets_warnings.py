"""What the client arms (bench/axolotl_arm.py, bench/trl_client_arms.py) share: a dataset loaded by the client's own
loader, with the warnings `datasets` logs meanwhile (about the dataset card, say), which the arms print."""

import logging


class Warnings(logging.Handler):
    """The warnings `datasets` logs while it loads a dataset."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def with_warnings(load, *args, **kwargs):
    """`load(*args, **kwargs)` and the warnings `datasets` logged while it ran."""
    caught, logger = Warnings(), logging.getLogger("datasets")
    logger.addHandler(caught)
    try:
        return load(*args, **kwargs), caught.messages
    finally:
        logger.removeHandler(caught)
