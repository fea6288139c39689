"""A word-level tokenizer for the tiny models (vocabulary 96) with a chat template, built offline."""

from __future__ import annotations

from conftest import VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def chat_tokenizer(template: bool = True) -> PreTrainedTokenizerFast:
    """Ids: <pad> 0, <s> 1, </s> 2, <|user|> 3, <|assistant|> 4, <|system|> 5, <|end|> 6, then w0..w88."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=SPECIAL[3:])
    if template:
        tokenizer.chat_template = TEMPLATE
    return tokenizer


def words(start: int, count: int) -> str:
    return " ".join(WORDS[(start + 7 * i) % len(WORDS)] for i in range(count))


def conversations(count: int = 6) -> list[list[dict[str, str]]]:
    """Conversations of different lengths, some with two turns."""
    result = []
    for i in range(count):
        turns = [{"role": "user", "content": words(i, 3 + i)},
                 {"role": "assistant", "content": words(i + 40, 5 + 2 * i)}]
        if i % 2:
            turns += [{"role": "user", "content": words(i + 9, 2)}, {"role": "assistant", "content": words(i, 4)}]
        result.append(turns)
    return result


def rendered(tokenizer, conversation) -> list[int]:
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids
