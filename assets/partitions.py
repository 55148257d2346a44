"""The `rounds` dynamic partitions: one key per on-policy round, r001, r002, …

Dagster cannot declare a dependency on the previous key of a dynamic partition, so a round finds its
parent by key here (round 1's parent is `offline_student`) and reads its checkpoint through the store.
"""

import re

import dagster as dg

rounds = dg.DynamicPartitionsDefinition(name="rounds")

FIRST_PARENT = "offline_student"
_KEY = re.compile(r"r(\d{3,})")


def round_number(key: str) -> int:
    match = _KEY.fullmatch(key)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"round key {key!r} is not of the form r001, r002, …: add partitions with such keys")
    return int(match.group(1))


def round_key(number: int) -> str:
    return f"r{number:03d}"


def parent_round(key: str) -> str | None:
    """The round whose checkpoint round `key` starts from; None for round 1 (it starts from offline_student)."""
    number = round_number(key)
    return round_key(number - 1) if number > 1 else None
