"""The dense model as the yardstick of a pruned one: KL divergence and top-1 agreement to the dense model on
held-out text and on the dense model's own chat replies, and the share of prompts the pruned model leaves
unanswered (after llama.cpp's ``perplexity --kl-divergence``).

``DenseReference.compute`` runs the dense model once, before pruning; the reference saves to a folder
(``reference.safetensors`` + ``reference.json``) and reloads to the same numbers, so that any number of pruned
variants are compared without the dense model. ``evaluate(pruned, reference)`` gives the metrics.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..setup.conversations import has_chat_template, packaged_path, prompt_ids, read_jsonl, stop_ids
from .divergence import TOP_K, Divergence, TopK
from .forcing import greedy_replies, reply_logits, text_logits
from .perplexity import test_text

FORMAT = 1
FILES = ("reference.safetensors", "reference.json")


def shipped_prompts() -> list[str]:
    """The 40 everyday prompts shipped in ``hf_snp/data/chat/prompts.jsonl`` (no calibration source uses them)."""
    return [record["prompt"] for record in read_jsonl(packaged_path("prompts.jsonl"))]


@dataclass
class DenseReference:
    """What the dense model does on held-out data: its top-k log-probabilities on text windows and on its own
    greedy chat replies (teacher-forced), the replies themselves, and how they were made (``meta``)."""

    text_ids: torch.Tensor  # [W, L] windows of the held-out text
    text_top: TopK  # [W*(L-1), k] the dense model's top-k at every position that predicts a next token
    prompts: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)  # each prompt in the chat template
    reply_ids: list[list[int]] = field(default_factory=list)  # the dense greedy replies (with their stop token)
    replies: list[str] = field(default_factory=list)
    chat_top: TopK | None = None  # [sum of reply lengths, k]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def compute(cls, model: Any, tokenizer: Any, text: str = "wikitext2-test-local", windows: int = 12,
                seq_len: int = 512, prompts: list[str] | None = None, max_new_tokens: int = 48, k: int = TOP_K,
                batch_size: int = 2, chat: bool | None = None, progress: bool = True) -> "DenseReference":
        """Run the dense ``model`` once. Text: the first ``windows`` non-overlapping windows of ``seq_len`` tokens
        of ``text`` (a file or ``wikitext2-test-local``; perplexity's protocol). Chat (default: when the tokenizer
        has a chat template): greedy replies of at most ``max_new_tokens`` to ``prompts`` (default: the shipped
        prompts), then their top-k log-probabilities with the replies teacher-forced. ``k``: 64 keeps the dense
        tail mass small (``meta["dense_tail_text"]``), which bounds what the top-k KL leaves out."""
        stream = tokenizer(test_text(text), return_tensors="pt").input_ids[0]
        windows = min(windows, len(stream) // seq_len)
        if windows == 0:
            raise ValueError(f"the reference text has {len(stream)} tokens, fewer than seq_len={seq_len}")
        text_ids = stream[: windows * seq_len].view(windows, seq_len)
        parts, nll = [], 0.0
        for logits, targets in text_logits(model, text_ids, batch_size, progress):
            parts.append(TopK.of(logits, k))
            nll += _nll(logits, targets)
        text_top = TopK.cat(parts)
        stop = stop_ids(tokenizer, getattr(model, "generation_config", None))
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or [0])[0])
        meta = {"format": FORMAT, "k": k, "text": text, "windows": windows, "seq_len": seq_len,
                "batch_size": batch_size, "max_new_tokens": max_new_tokens, "stop_ids": stop, "pad_id": pad_id,
                "dense_perplexity": _perplexity(nll, text_top.logprobs.shape[0]),
                "dense_tail_text": float(text_top.tail_mass().mean()), "model_type": model.config.model_type}
        reference = cls(text_ids, text_top, meta=meta)
        if chat if chat is not None else has_chat_template(tokenizer):
            reference._add_chat(model, tokenizer, shipped_prompts() if prompts is None else list(prompts), progress)
        return reference

    def _add_chat(self, model: Any, tokenizer: Any, prompts: list[str], progress: bool) -> None:
        meta = self.meta
        self.prompts, self.prompt_ids = prompts, [prompt_ids(tokenizer, p) for p in prompts]
        self.reply_ids = greedy_replies(model, self.prompt_ids, meta["max_new_tokens"], meta["stop_ids"],
                                        meta["pad_id"], meta["batch_size"], progress)
        self.replies = [reply_text(tokenizer, r, meta["stop_ids"]) for r in self.reply_ids]
        self.chat_top = TopK.cat([TopK.of(logits, meta["k"]) for logits in reply_logits(
            model, self.prompt_ids, self.reply_ids, meta["batch_size"], meta["pad_id"], progress)])
        meta["dense_tail_chat"] = float(self.chat_top.tail_mass().mean())
        meta["dense_empty_reply_share"] = sum(not r for r in self.replies) / len(prompts)

    def save(self, path: str) -> None:
        """Write ``reference.safetensors`` and ``reference.json`` into the folder ``path``."""
        os.makedirs(path, exist_ok=True)
        tensors = {"text_ids": self.text_ids, "text_logprobs": self.text_top.logprobs,
                   "text_top_ids": self.text_top.ids}
        if self.chat_top is not None:
            tensors.update(chat_logprobs=self.chat_top.logprobs, chat_top_ids=self.chat_top.ids)
        save_file({name: t.contiguous() for name, t in tensors.items()}, os.path.join(path, FILES[0]))
        record = {"meta": self.meta, "prompts": self.prompts, "prompt_ids": self.prompt_ids,
                  "reply_ids": self.reply_ids, "replies": self.replies}
        with open(os.path.join(path, FILES[1]), "w", encoding="utf-8") as handle:
            json.dump(record, handle, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, path: str) -> "DenseReference":
        """A reference saved by :meth:`save`."""
        missing = [name for name in FILES if not os.path.isfile(os.path.join(path, name))]
        if missing:
            raise FileNotFoundError(f"{path!r} is not a saved dense reference (missing {', '.join(missing)}); make one "
                                    "with DenseReference.compute(model, tokenizer).save(path)")
        tensors = load_file(os.path.join(path, FILES[0]))
        with open(os.path.join(path, FILES[1]), encoding="utf-8") as handle:
            record = json.load(handle)
        if record["meta"].get("format") != FORMAT:
            raise ValueError(f"{path!r} holds a dense reference of format {record['meta'].get('format')}, this "
                             f"hf_snp reads format {FORMAT}: compute the reference again")
        chat = TopK(tensors["chat_logprobs"], tensors["chat_top_ids"]) if "chat_logprobs" in tensors else None
        return cls(tensors["text_ids"], TopK(tensors["text_logprobs"], tensors["text_top_ids"]), record["prompts"],
                   record["prompt_ids"], record["reply_ids"], record["replies"], chat, record["meta"])


def reply_text(tokenizer: Any, reply: list[int], stop: list[int]) -> str:
    """A reply's text without its stop token and special tokens, stripped ("" for an empty reply)."""
    return tokenizer.decode([t for t in reply if t not in stop], skip_special_tokens=True).strip()


def _perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if nll / count < 700 else math.inf


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="sum"))


@torch.no_grad()
def compare(model: Any, reference: DenseReference, tokenizer: Any = None, show: int = 3,
            progress: bool = False) -> dict[str, Any]:
    """The compared ``model`` against the dense reference: ``kl_text`` / ``agreement_text`` (mean KL(dense ||
    model) in nats per token over the top-k support and a tail bucket, and top-1 agreement, on the text
    windows), ``perplexity_text``, and with chat prompts ``kl_chat`` / ``agreement_chat`` on the dense replies
    teacher-forced, ``empty_reply_share`` of the model's own greedy replies, and ``replies``: the first ``show``
    prompts with both replies. Chat keys are None when the reference has no prompts."""
    meta, text = reference.meta, Divergence()
    nll, position = 0.0, 0
    for logits, targets in text_logits(model, reference.text_ids, meta["batch_size"], progress):
        rows = slice(position, position + logits.shape[0])
        text.add(TopK(reference.text_top.logprobs[rows], reference.text_top.ids[rows]), logits)
        nll += _nll(logits, targets)
        position += logits.shape[0]
    result: dict[str, Any] = {"kl_text": text.mean_kl, "agreement_text": text.agreement,
                              "perplexity_text": _perplexity(nll, text.count), "kl_chat": None,
                              "agreement_chat": None, "empty_reply_share": None, "replies": []}
    if reference.prompts:
        result.update(_compare_chat(model, reference, tokenizer, show, progress))
    return result


def _compare_chat(model: Any, reference: DenseReference, tokenizer: Any, show: int, progress: bool) -> dict[str, Any]:
    if tokenizer is None:
        raise ValueError("comparing chat replies needs the tokenizer (to read the replies): pass tokenizer=...")
    meta, chat, position = reference.meta, Divergence(), 0
    for logits in reply_logits(model, reference.prompt_ids, reference.reply_ids, meta["batch_size"], meta["pad_id"],
                               progress):
        rows = slice(position, position + logits.shape[0])
        chat.add(TopK(reference.chat_top.logprobs[rows], reference.chat_top.ids[rows]), logits)
        position += logits.shape[0]
    own = greedy_replies(model, reference.prompt_ids, meta["max_new_tokens"], meta["stop_ids"], meta["pad_id"],
                         meta["batch_size"], progress)
    texts = [reply_text(tokenizer, r, meta["stop_ids"]) for r in own]
    shown = [{"prompt": p, "dense": d, "pruned": t} for p, d, t in zip(reference.prompts, reference.replies, texts)]
    return {"kl_chat": chat.mean_kl, "agreement_chat": chat.agreement,
            "empty_reply_share": sum(not t for t in texts) / len(texts), "replies": shown[:show]}


def evaluate(pruned: Any, reference: DenseReference | str, tokenizer: Any = None, show: int = 3,
             progress: bool = False) -> dict[str, Any]:
    """:func:`compare` for a pruned model or a ``PruneResult`` (its tokenizer is used when none is given), against
    a :class:`DenseReference` or the folder it was saved to."""
    model = pruned if isinstance(pruned, torch.nn.Module) else pruned.model
    tokenizer = tokenizer if tokenizer is not None else getattr(pruned, "tokenizer", None)
    if isinstance(reference, (str, os.PathLike)):
        reference = DenseReference.load(str(reference))
    return compare(model, reference, tokenizer, show, progress)
