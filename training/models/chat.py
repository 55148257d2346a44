"""Prompts as each model sees them: its own chat template, or the raw text.

A prompt row has `prompt` (text), and optionally `messages` (a conversation: a list of
{role, content}, OpenAI style, possibly multi-turn) and `system_prompt`. A model renders it as

    chat template    tokenizer.apply_chat_template(conversation, add_generation_prompt=True), where
                     conversation = messages, or [{user: prompt}], with the system prompt first
                     unless the conversation opens with its own
    raw text         <bos> prompt, for models without a chat template (the embedded pair)

`prompt_rendering(tokenizer)` names the rendering (the template's hash, or "raw"); rows store it
beside their `prompt_token_ids`, so a model with another template re-renders the prompt
(`prompt_ids_for`) instead of reading ids made for someone else: teacher and student may differ in
template while sharing a vocabulary.
"""

import pyarrow as pa

from training.models.tokenizer import chat_template_hash
from training.schema.tables import arrow_sql

RAW = "raw"
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)


def prompt_rendering(tokenizer) -> str:
    return chat_template_hash(tokenizer) or RAW


# SQL over a prompt table: the conversation of each row, its messages, else its prompt as one user
# turn, with the row's system prompt first unless the conversation has one (also used by the export)
CONVERSATION = """CASE WHEN system_prompt IS NOT NULL AND coalesce(messages[1].role, 'user') <> 'system'
    THEN list_prepend({'role': 'system', 'content': system_prompt}, coalesce(messages, [{'role': 'user', 'content': prompt}]))
    ELSE coalesce(messages, [{'role': 'user', 'content': prompt}]) END"""


def conversations(prompts: pa.Table) -> list[list[dict]]:
    """The conversation of each row (`CONVERSATION`), as lists of {role, content}."""
    with arrow_sql() as connection:
        connection.register("rows", with_conversation_columns(prompts.select([c for c in prompts.column_names
                                                                              if c in ("prompt", "messages", "system_prompt")])))
        return connection.sql(f"SELECT {CONVERSATION} AS c FROM rows").to_arrow_table()["c"].to_pylist()


def is_conversation(prompts: pa.Table) -> bool:
    """Whether any row needs a chat template: it has messages or a system prompt."""
    return any(
        name in prompts.column_names and prompts[name].null_count < prompts.num_rows for name in ("messages", "system_prompt")
    )


def render(tokenizer, prompts: pa.Table) -> list[list[int]]:
    """The token ids of each prompt row as `tokenizer`'s model sees it (see the module docstring)."""
    if prompts.num_rows == 0:
        return []
    if getattr(tokenizer, "chat_template", None):
        texts = tokenizer.apply_chat_template(conversations(prompts), add_generation_prompt=True, tokenize=False)
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    if is_conversation(prompts):
        raise ValueError(
            "these prompts are conversations (messages or a system prompt), but the model's tokenizer has no chat "
            "template: use a chat model (one whose tokenizer_config.json has chat_template), or give plain-text prompts "
            "without system_prompt"
        )
    return tokenizer(prompts["prompt"].to_pylist(), add_special_tokens=True)["input_ids"]


def prompt_ids_for(tokenizer, rows: pa.Table) -> pa.Array:
    """The rows' `prompt_token_ids` when they were rendered as `tokenizer` renders
    (`prompt_rendering` column), else the prompts rendered anew for it."""
    stored = rows["prompt_token_ids"]
    if "prompt_rendering" not in rows.column_names or rows["prompt_rendering"].unique().to_pylist() == [prompt_rendering(tokenizer)]:
        return stored
    return pa.array(render(tokenizer, rows), stored.type)


def with_conversation_columns(table: pa.Table, system_prompt: str | None = None) -> pa.Table:
    """`table` with `messages` (null: the prompt is one user turn) and `system_prompt` columns when
    it lacks them, as every prompt table has."""
    if "messages" not in table.column_names:
        table = table.append_column("messages", pa.nulls(table.num_rows, MESSAGES))
    if "system_prompt" not in table.column_names:
        table = table.append_column("system_prompt", pa.repeat(pa.scalar(system_prompt or None, pa.string()), table.num_rows))
    return table
