"""Conversations in the model's own format: the accepted forms, rendering with the tokenizer's chat template, and
the template's pieces around each turn (for text the model writes itself, and for its replies in evaluation).

A conversation is a list of ``{"role", "content"}`` messages (ShareGPT's ``{"from", "value"}`` is accepted too).
Rendered text is tokenized with ``add_special_tokens=False``: a chat template writes its own BOS where the model
wants one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

Conversation = list[dict[str, str]]

PACKAGED_CHAT = {"chat-local": "conversations.jsonl"}
COLUMNS = ("messages", "conversations")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant"}
SENTINELS = ("\u2063S1\u2063", "\u2063S2\u2063", "\u2063S3\u2063")  # invisible separators: no template edits them


class ConversationError(ValueError):
    """Conversations that cannot be read or rendered."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def packaged_path(name: str) -> str:
    """Path of a data file shipped in ``hf_snp/data/chat`` (``conversations.jsonl``, ``prompts.jsonl``)."""
    return str(resources.files("hf_snp").joinpath("data", "chat", name))


def read_jsonl(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _jsonl_is_conversations(path: str) -> bool:
    """True when the first record of a .jsonl file has a ``messages`` or ``conversations`` field."""
    with open(path, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        record = json.loads(first) if first else None
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and any(column in record for column in COLUMNS)


def _is_message_list(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) > 0 and all(isinstance(m, dict) for m in item)


def _records_conversations(records: list[Any], where: str) -> list[Conversation]:
    conversations = []
    for number, record in enumerate(records, 1):
        column = next((c for c in COLUMNS if isinstance(record, dict) and c in record), None)
        if column is None:
            raise ConversationError(f"{where}: record {number} has no 'messages' or 'conversations' field")
        conversations.append(normalize(record[column], f"{where}: record {number}"))
    return conversations


def conversations_from(spec: Any) -> tuple[list[Conversation], str] | None:
    """The conversations in ``spec`` and a short description, or None when ``spec`` is not conversational:
    ``chat-local`` (shipped), a ``.jsonl`` file with a ``messages``/``conversations`` field, a list of message
    lists (or of such records), or a ``datasets.Dataset`` with a ``messages``/``conversations`` column."""
    if isinstance(spec, str):
        if spec in PACKAGED_CHAT:
            return _records_conversations(read_jsonl(packaged_path(PACKAGED_CHAT[spec])), spec), spec
        if spec.endswith(".jsonl") and os.path.isfile(spec) and _jsonl_is_conversations(spec):
            return _records_conversations(read_jsonl(spec), spec), os.path.basename(spec)
        return None
    if hasattr(spec, "column_names"):
        column = next((c for c in COLUMNS if c in spec.column_names), None)
        if column is None:
            return None
        rows = [normalize(row, f"dataset row {i}") for i, row in enumerate(spec[column])]
        return rows, f"datasets.Dataset ({column})"
    if isinstance(spec, (list, tuple)) and spec and all(_is_message_list(item) for item in spec):
        return [normalize(item, f"conversation {i}") for i, item in enumerate(spec)], f"{len(spec)} conversations"
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(r, dict) and any(c in r for c in COLUMNS)
                                                        for r in spec):
        return _records_conversations(list(spec), "records"), f"{len(spec)} conversations"
    return None


def normalize(messages: Any, where: str) -> Conversation:
    """``{"role", "content"}`` messages (ShareGPT ``{"from", "value"}`` converted); a clear error otherwise."""
    if not _is_message_list(messages):
        raise ConversationError(f"{where}: a conversation must be a non-empty list of messages "
                                "({'role': ..., 'content': ...})")
    result = []
    for message in messages:
        if "role" in message and "content" in message:
            role, content = message["role"], message["content"]
        elif "from" in message and "value" in message:
            role, content = SHAREGPT_ROLES.get(str(message["from"]).lower(), message["from"]), message["value"]
        else:
            raise ConversationError(f"{where}: a message needs 'role' and 'content' (or 'from' and 'value'); "
                                    f"got keys {sorted(message)}")
        if not isinstance(content, str):
            raise ConversationError(f"{where}: message content must be a string, got {type(content).__name__}")
        result.append({"role": str(role), "content": content})
    return result


def render(conversations: list[Conversation], tokenizer: Any) -> list[list[int]]:
    """Each conversation's tokens in the chat template (no generation prompt)."""
    if not has_chat_template(tokenizer):
        raise ConversationError("conversation calibration needs a tokenizer with a chat template; give plain text "
                                "instead, or set tokenizer.chat_template")
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in conversations]
    return [encode(tokenizer, text) for text in texts]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Tokens of rendered text, without the tokenizer adding its own special tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A single user prompt in the chat template, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return encode(tokenizer, text)


def stop_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The tokens that end a turn: the generation config's and tokenizer's EOS, and the token that closes a user
    message in the chat template (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``) when it is special."""
    ids = []
    for value in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        ids += value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    if has_chat_template(tokenizer):
        pieces = _pieces(tokenizer)
        if pieces is not None:
            closing = encode(tokenizer, pieces[1])
            special = set(getattr(tokenizer, "all_special_ids", []))
            ids += [closing[0]] if closing and closing[0] in special else []
    return list(dict.fromkeys(int(i) for i in ids))


@dataclass(frozen=True)
class ChatTurns:
    """The chat template's tokens around turns: before the first user message, between a user message and the
    assistant's reply (with the generation prompt), and between a reply and the next user message."""

    first_user: list[int]
    user_to_assistant: list[int]
    assistant_to_user: list[int]

    @classmethod
    def of(cls, tokenizer: Any) -> "ChatTurns":
        pieces = _pieces(tokenizer)
        if pieces is None:
            raise ConversationError("the chat template changes message text, so its turns cannot be located; "
                                    "give conversations or text for calibration instead of 'self'")
        return cls(*(encode(tokenizer, piece) for piece in pieces))


def _pieces(tokenizer: Any) -> tuple[str, str, str] | None:
    """(before the first user message, user -> assistant, assistant -> next user) as text, None when the template
    rewrites the messages so that the sentinels cannot be found."""
    one, two, three = SENTINELS
    try:
        single = tokenizer.apply_chat_template([{"role": "user", "content": one}], tokenize=False,
                                               add_generation_prompt=True)
        multi = tokenizer.apply_chat_template([{"role": "user", "content": one}, {"role": "assistant", "content": two},
                                               {"role": "user", "content": three}], tokenize=False)
    except Exception:  # noqa: BLE001  (templates raise their own errors: a template without these roles)
        return None
    if single.count(one) != 1 or multi.count(two) != 1 or multi.count(three) != 1:
        return None
    before, after = single.split(one)
    between = multi[multi.index(two) + len(two) : multi.index(three)]
    return before, after, between
