"""`distill export`: a pair table as TRL's preference layout (prompt, chosen, rejected), read back with
`datasets` as DPOTrainer reads it; the axolotl layout's alignment rule on the chat pair's two templates;
each format refuses the other kind of table. The clients' own code on each export: bench/clients.py."""

import math

import pyarrow as pa
import pytest
from datasets import load_dataset

from pipelines.cli import main as distill
from storage import export
from storage.export import AXOLOTL_LOGPROB_FLOOR, exported
from storage.store import Store
from training.models.chat import MESSAGES, RAW
from training.models.checkpoints import load_model, load_tokenizer, model_card
from training.models.tokenizer import build_char_tokenizer, tokenizer_hash
from training.schema.signal import CODEC, Q8_CODEC

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


def responses(tokenizer, replies: list[str], finish_reasons: list[str], ids: list | None = None, k: int = 3) -> pa.Table:
    """Teacher responses as teacher_labeled holds them: the reply's ids (`ids`, else the text's) end with
    <|im_end|> when it stopped, and row j of the signal has the token y_j it predicts first (then two
    others), so a row's place can be read."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = ids or [tokenizer(text, add_special_tokens=False)["input_ids"] + ([end] if stop == "stop" else [])
                  for text, stop in zip(replies, finish_reasons)]
    n = len(replies)
    return pa.table({
        "sample_id": [f"s{i}" for i in range(n)], "prompt": [f"What is {i}+{i}?" for i in range(n)],
        "messages": pa.array(([None, TWO_TURNS] + [None] * n)[:n], MESSAGES), "system_prompt": [SYSTEM] * n,
        "completion": replies, "completion_token_ids": pa.array(ids, IDS), "finish_reason": finish_reasons,
        "topk_ids": pa.array([[[t, t + 1, t + 2] for t in row] for row in ids], pa.list_(IDS)),
        "topk_logprobs": pa.array([[[-0.1, -3.0, -math.inf]] * len(row) for row in ids], pa.list_(pa.list_(pa.float32()))),
        "k": pa.array([k] * n, pa.int32()), "codec": [CODEC] * n, "tokenizer_hash": [tokenizer_hash(tokenizer)] * n,
    })


@pytest.mark.parametrize("model,logprobs", [("teacher", "float32"), ("student", "float32"), ("teacher", "float16")])
def test_axolotl_rows_predict_the_token_after_their_position(chat_pair, model, logprobs):
    """axolotl right-aligns the rows to its input_ids and scores the hidden state at p, which predicts
    x_{p+1}, against the row at p: every row must be the distribution of the token after its position.
    The teacher's template is ChatML ("\n" after <|im_end|>), the student's has nothing after it;
    float16 is a signal stored at logprob_dtype float16 (DuckDB reads no Arrow float16)."""
    tokenizer = load_tokenizer(str(chat_pair[model]))
    table = responses(tokenizer, ["4", "6", "10", "1"], ["stop", "stop", "stop", "length"])
    signal = table.schema.get_field_index("topk_logprobs")
    table = table.set_column(signal, "topk_logprobs", table["topk_logprobs"].cast(pa.list_(pa.list_(getattr(pa, logprobs)()))))
    rows, dropped = exported(table, "axolotl", tokenizer)
    assert rows["sample_id"].to_pylist() == ["s0", "s1", "s2"] and dropped["cut_at_length_limit"] == 1
    for row, stored in zip(rows.to_pylist(), table.to_pylist()):
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]  # as axolotl does
        start = len(ids) - len(row["target_token_ids"])  # right-aligned
        reply = len(stored["completion_token_ids"])
        after_reply = len(row["target_token_ids"]) - reply - 1
        assert after_reply == (1 if model == "teacher" else 0)  # one row per template token after the reply
        for position in range(start, len(ids) - 1):
            assert row["target_token_ids"][position - start][0] == ids[position + 1], (position, ids)
        assert row["target_token_ids"][-1][0] == tokenizer.eos_token_id  # the filler row: it predicts nothing
        assert row["target_token_ids"][:reply] == stored["topk_ids"]  # the teacher's own rows, unchanged
        assert {len(r) for r in row["target_token_ids"]} == {len(r) for r in row["logprobs"]} == {3}
        assert all(AXOLOTL_LOGPROB_FLOOR <= v <= 0 for r in row["logprobs"] for v in r)  # finite: -inf is NaN in axolotl


def test_axolotl_drops_what_the_students_template_cannot_reproduce(chat_pair):
    tokenizer = load_tokenizer(str(chat_pair["teacher"]))
    whole, end = tokenizer.convert_tokens_to_ids(["What", "<|im_end|>"])
    split = tokenizer.convert_tokens_to_ids(list("What"))  # the teacher sampled W, h, a, t: "What" re-tokenizes as one token
    table = responses(tokenizer, ["What", "What"], ["stop", "stop"], ids=[[whole, end], split + [end]])
    rows, dropped = exported(table, "axolotl", tokenizer)
    assert rows["sample_id"].to_pylist() == ["s0"] and dropped["reply_tokenizes_differently"] == 1


def test_axolotl_refuses_what_it_cannot_lay_out(chat_pair):
    tokenizer = load_tokenizer(str(chat_pair["teacher"]))
    table = responses(tokenizer, ["4"], ["stop"])
    with pytest.raises(ValueError, match="give the student's tokenizer"):
        exported(table, "axolotl")
    with pytest.raises(ValueError, match="has none .* export --format trl or messages"):
        exported(table, "axolotl", build_char_tokenizer())  # the embedded pair: raw text, no template
    replaced = lambda name, value: table.set_column(table.schema.get_field_index(name), name, pa.array([value]))
    with pytest.raises(ValueError, match="another vocabulary"):
        exported(replaced("tokenizer_hash", "other"), "axolotl", tokenizer)
    with pytest.raises(ValueError, match="decode it first"):
        exported(replaced("codec", "topk-q8"), "axolotl", tokenizer)
    assert exported(replaced("codec", Q8_CODEC), "axolotl", tokenizer)[0].num_rows == 1  # float logprobs on a grid: as they are


def test_every_export_and_stored_dataset_has_a_card_that_datasets_and_the_hub_read(tmp_path, chat_pair, monkeypatch, capsys):
    from huggingface_hub import DatasetCard

    monkeypatch.setattr(export, "EXPORT_ROWS", 1)  # a row at a time: the row cut at the length limit is a slice of its own

    teacher = str(chat_pair["teacher"])
    tokenizer = load_tokenizer(teacher)
    labeled = responses(tokenizer, ["4", "6", "1"], ["stop", "stop", "length"]).append_column("teacher", pa.array([teacher] * 3))
    store = Store(tmp_path / "home")
    store.write_dataset("teacher_labeled", labeled)
    out = tmp_path / "axolotl"
    assert distill(["--home", str(store.root), "export", "teacher_labeled", "--format", "axolotl", "--out", str(out)]) == 1
    assert "pass --tokenizer" in capsys.readouterr().err and not out.exists()  # no student in the store yet
    store.write_card("student", model_card(teacher, *load_model(teacher)).extended(path=teacher))  # student_model's card
    assert distill(["--home", str(store.root), "export", "teacher_labeled", "--format", "axolotl", "--out", str(out)]) == 0
    card = DatasetCard.load(out / "README.md")  # the Hub's own parser
    assert card.data.license == "other" and card.data.size_categories == ["n<1K"] and "top-3-logprobs" in card.data.tags
    assert f"`{teacher}`" in card.text and "| k | `3` |" in card.text and "length limit: 1" in card.text
    rows = load_dataset(str(out), split="train")  # `datasets` follows the card's configs and features
    assert rows.num_rows == 2 and rows.features["target_token_ids"] == datasets_feature("int32")

    assert distill(["--home", str(store.root), "card", "teacher_labeled"]) == 0  # beside the stored shards
    stored = load_dataset(str(store.dataset_dir("teacher_labeled").resolve()), split="train")
    assert stored.num_rows == 3 and stored.column_names == labeled.column_names
    assert distill(["--home", str(store.root), "card", "teacher_labeled", "--out", str(tmp_path / "card")]) == 0  # elsewhere
    assert load_dataset(str(tmp_path / "card"), split="train").num_rows == 3  # its data_files point at the shards


def datasets_feature(value: str):
    from datasets import List, Value

    return List(List(Value(value)))


def test_a_dataset_exports_in_one_layout_whatever_its_slices(tmp_path, monkeypatch):
    """Rows rendered raw and with a template in one dataset: every row conversational, though a slice of one row
    holds only raw rows (the layout is the dataset's: a file has one schema)."""
    monkeypatch.setattr(export, "EXPORT_ROWS", 1)
    store = Store(tmp_path / "home")
    store.write_dataset("teacher_labeled", pa.table({"sample_id": ["s0", "s1"], "prompt": ["1+1=", "2+2="], "completion": ["2", "4"],
                                                     "prompt_rendering": [RAW, "chatml-hash"]}))
    assert distill(["--home", str(store.root), "export", "teacher_labeled", "--format", "trl", "--out", str(tmp_path / "out")]) == 0
    rows = load_dataset(str(tmp_path / "out"), split="train")
    assert rows["prompt"] == [[{"role": "user", "content": "1+1="}], [{"role": "user", "content": "2+2="}]]
