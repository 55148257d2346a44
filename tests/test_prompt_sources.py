import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.data.prompt_sources import load_source, select_prompts
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
    assert sum(dropped.values()) == 3 and dropped["blank"] == (2 if suffix != ".csv" else 1)


def test_a_mixed_type_column_keeps_every_string_and_counts_the_rest(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in ["What is 2+2?", 5, ["a", "b"], None, "", "Name a prime."]))
    kept, dropped = select_prompts(load_source("files", "train", files=[str(path)]), "prompt", None, limit=10)
    assert kept["prompt"].to_pylist() == ["What is 2+2?", "Name a prime."]
    assert dropped == {"not a string (a number)": 1, "not a string (a list)": 1, "missing": 1, "blank": 1}
    kept, dropped = select_prompts(pa.table({"prompt": [1, 2]}), "prompt", None, limit=10)
    assert kept.num_rows == 0 and dropped == {"not a string (a number)": 2}


def test_conversations_are_cut_at_the_last_user_turn_and_checked(tmp_path):
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
         {"role": "assistant", "content": "the reply to replace"}],
        [{"role": "bot", "content": "x"}],
        [{"role": "system", "content": "only a system turn"}],
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in chats))
    kept, dropped = select_prompts(load_source("files", "train", files=[str(path)]), "messages", None, limit=10)
    assert kept["messages"].to_pylist() == [chats[0], chats[1][:3]]
    assert kept["prompt"].to_pylist() == ["Hi", "user: q1\nassistant: a1\nuser: q2"]
    assert dropped == {"a turn with an unknown role": 1, "no user turn": 1}


def test_a_malformed_file_is_named_with_the_reason(tmp_path):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("prompt\nhello\n")
    bad.write_text("prompt,answer\nhello,1\nx,2,3,4\n")
    with pytest.raises(ValueError, match=r"cannot read the prompt file .*bad\.csv: ParserError: .*Expected 2 fields in line 3"):
        load_source("files", "train", files=[str(good), str(bad)])
    with pytest.raises(ValueError, match=r"cannot read dataset '.*no_such_dataset'"):
        load_source("datasets", "train", dataset=str(tmp_path / "no_such_dataset"))


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
