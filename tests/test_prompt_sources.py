import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.prompt_sources import load_source, select_prompts
from training.tasks import get_task

ROWS = [
    {"question": "12+7=", "label": 19},
    {"question": "", "label": 0},
    {"question": "   ", "label": 0},
    {"question": None, "label": 1},
    {"question": "4*9=", "label": 36},
]


def test_task_prompts_carry_answers():
    table = get_task("arithmetic").prompts("train", 10, 0)
    assert table.num_rows == 10 and table.column_names == ["prompt", "answer"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files_drop_and_count_unusable_prompts(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif suffix == ".csv":
        path.write_text("question,label\n" + "\n".join(f"{r['question'] or ''},{r['label']}" for r in ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    source = load_source("files", "train", files=[str(path)])
    kept, dropped = select_prompts(source, "question", "label", limit=100)
    assert kept["prompt"].to_pylist() == ["12+7=", "4*9="]
    assert kept["answer"].to_pylist() == ["19", "36"]
    assert dropped == 3


def test_non_string_prompt_column_is_dropped_not_fatal():
    kept, dropped = select_prompts(pa.table({"prompt": [1, 2]}), "prompt", None, limit=10)
    assert kept.num_rows == 0 and dropped == 2


def test_missing_column_names_the_columns_there_are():
    with pytest.raises(ValueError, match=r"no column 'prompt'.*\['question', 'label'\]"):
        select_prompts(pa.Table.from_pylist(ROWS), "prompt", None, limit=10)


def test_a_datasets_source_with_split(tmp_path):
    directory = tmp_path / "my_dataset"
    directory.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:1]), directory / "train.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[4:]), directory / "test.parquet")
    source = load_source("datasets", "test", dataset=str(directory))
    assert select_prompts(source, "question", None, 10)[0]["prompt"].to_pylist() == ["4*9="]


def test_files_of_unknown_format_or_missing(tmp_path):
    with pytest.raises(ValueError, match="give .jsonl"):
        load_source("files", "train", files=[str(tmp_path / "a.txt")])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_source("files", "train", files=[str(tmp_path / "a.jsonl")])
