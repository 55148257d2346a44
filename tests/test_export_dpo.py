"""`distill export <pairs> --format dpo`: a pair table as TRL's preference layout (prompt, chosen, rejected),
read back with `datasets` as DPOTrainer reads it; and each format refuses the other kind of table.
TRL's own DPOTrainer on such an export: bench/trl_dpo_client.py."""

import pyarrow as pa
import pytest
from datasets import load_dataset

from pipelines.cli import main as distill
from storage.export import exported
from storage.store import Store
from training.models.chat import MESSAGES, RAW

IDS = pa.list_(pa.int32())
SYSTEM = "You are terse."
TWO_TURNS = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3+3?"}]


def pair_table(rendering: str, messages: list, system_prompts: list) -> pa.Table:
    """Pairs with the columns of a pair table (preference_pairs, round_pairs), one per entry of `messages`."""
    n = len(messages)
    floats = lambda values: pa.array(values, pa.float64())
    return pa.table({
        "pair_id": [f"pair{i}" for i in range(n)], "prompt_id": [f"prompt{i}" for i in range(n)],
        "prompt": [f"{i}+{i}=?" for i in range(n)], "messages": pa.array(messages, MESSAGES),
        "system_prompt": pa.array(system_prompts, pa.string()), "answer": [str(2 * i) for i in range(n)],
        "prompt_token_ids": pa.array([[1, 2, i] for i in range(n)], IDS), "prompt_rendering": [rendering] * n,
        "chosen_token_ids": pa.array([[3, i] for i in range(n)], IDS), "rejected_token_ids": pa.array([[4, i] for i in range(n)], IDS),
        "chosen": [str(2 * i) for i in range(n)], "rejected": [str(2 * i + 1) for i in range(n)],
        "chosen_sample_id": [f"c{i}" for i in range(n)], "rejected_sample_id": [f"r{i}" for i in range(n)],
        "chosen_score": floats([1.0] * n), "rejected_score": floats([0.0] * n), "margin": floats([1.0, 0.5, 0.25][:n]),
        "judge": ["verifier"] * n, "policy": ["best_vs_worst"] * n,
        "reference_chosen_logprob": floats([-1.5] * n), "reference_rejected_logprob": floats([-2.5] * n),
        "reference_weights_hash": ["abc"] * n,
    })


CHAT_PAIRS = pair_table("chatml-hash", [None, TWO_TURNS, [{"role": "system", "content": "Own system."}] + TWO_TURNS[2:]],
                        [SYSTEM, SYSTEM, SYSTEM])
RAW_PAIRS = pair_table(RAW, [None, None], [None, None])


def exported_file(tmp_path, pairs: pa.Table, file_type: str):
    """`pairs` stored as preference_pairs, exported by `distill export`, loaded as TRL loads a local file."""
    Store(tmp_path / "home").write_dataset("preference_pairs", pairs)
    assert distill(["--home", str(tmp_path / "home"), "export", "preference_pairs", "--format", "dpo",
                    "--out", str(tmp_path / "out"), "--as", file_type]) == 0
    builder = "parquet" if file_type == "parquet" else "json"
    return load_dataset(builder, data_files=str(tmp_path / "out" / f"train.{file_type}"), split="train")


@pytest.mark.parametrize("file_type", ["parquet", "jsonl"])
def test_conversational_pairs_export_as_trl_preference_conversations(tmp_path, file_type):
    rows = exported_file(tmp_path, CHAT_PAIRS, file_type)
    assert rows.column_names == ["pair_id", "prompt", "chosen", "rejected", "margin"]
    assert rows["pair_id"] == ["pair0", "pair1", "pair2"] and rows["margin"] == [1.0, 0.5, 0.25]
    system = {"role": "system", "content": SYSTEM}
    assert rows[0]["prompt"] == [system, {"role": "user", "content": "0+0=?"}]
    assert rows[1]["prompt"] == [system] + TWO_TURNS  # the pair's messages, up to the assistant turn
    assert rows[2]["prompt"] == [{"role": "system", "content": "Own system."}, TWO_TURNS[2]]  # its own system turn wins
    assert rows[1]["chosen"] == [{"role": "assistant", "content": "2"}]
    assert rows[1]["rejected"] == [{"role": "assistant", "content": "3"}]


@pytest.mark.parametrize("file_type", ["parquet", "jsonl"])
def test_raw_prompt_pairs_export_as_text(tmp_path, file_type):
    rows = exported_file(tmp_path, RAW_PAIRS, file_type)
    assert rows.column_names == ["pair_id", "prompt", "chosen", "rejected", "margin"]
    assert rows.to_list() == [{"pair_id": "pair0", "prompt": "0+0=?", "chosen": "0", "rejected": "1", "margin": 1.0},
                              {"pair_id": "pair1", "prompt": "1+1=?", "chosen": "2", "rejected": "3", "margin": 0.5}]


def test_each_format_refuses_the_other_kind_of_table(tmp_path, capsys):
    responses = pa.table({"sample_id": ["s0"], "prompt": ["1+1=?"], "completion": ["2"]})
    with pytest.raises(ValueError, match="export preference_pairs or round_pairs"):
        exported(responses, "dpo")
    with pytest.raises(ValueError, match="no \\['margin'\\]"):
        exported(CHAT_PAIRS.drop_columns(["margin"]), "dpo")
    for format in ("trl", "messages", "axolotl"):
        with pytest.raises(ValueError, match="pair table .* export it in the dpo format"):
            exported(CHAT_PAIRS, format)
    Store(tmp_path / "home").write_dataset("preference_pairs", CHAT_PAIRS)
    assert distill(["--home", str(tmp_path / "home"), "export", "preference_pairs", "--format", "trl", "--out", str(tmp_path)]) == 1
    assert "dpo format" in capsys.readouterr().err and not (tmp_path / "train.parquet").exists()
