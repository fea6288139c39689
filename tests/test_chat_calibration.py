"""Calibration in the model's own format: conversations rendered with the chat template (every accepted form),
padding that never reaches the statistics, text the model writes itself (calibration='self'), and mixtures."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from chat_helpers import chat_tokenizer, conversations, rendered
from conftest import prune_quiet, tiny_llama

from hf_snp.adapters import get_adapter
from hf_snp.config import PruneConfig
from hf_snp.methods import get_method
from hf_snp.passes.engine import BlockStream, StreamingEngine
from hf_snp.setup.calibration import (
    CalibrationData,
    CalibrationError,
    load_calibration,
    needs_model,
    window_counts,
)
from hf_snp.setup.conversations import ChatTurns, ConversationError, conversations_from, stop_ids
from hf_snp.setup.self_calibration import self_calibration


def padded_rows(calib: CalibrationData) -> set[tuple[int, ...]]:
    return {tuple(ids[mask.bool()].tolist()) for ids, mask in zip(calib.input_ids, calib.attention_mask)}


def test_every_conversation_form_renders_the_same_windows(tmp_path):
    tokenizer, convs = chat_tokenizer(), conversations()
    (tmp_path / "messages.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    sharegpt = [[{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in c] for c in convs]
    (tmp_path / "sharegpt.jsonl").write_text("".join(json.dumps({"conversations": c}) + "\n" for c in sharegpt))
    forms = [convs, [{"messages": c} for c in convs], str(tmp_path / "messages.jsonl"),
             str(tmp_path / "sharegpt.jsonl"), datasets.Dataset.from_dict({"messages": convs}),
             datasets.Dataset.from_dict({"conversations": sharegpt})]
    expected = {tuple(rendered(tokenizer, c)) for c in convs}
    length = max(len(row) for row in expected) + 3
    for form in forms:
        padded = load_calibration(form, tokenizer, len(convs), length, seed=2, pad_conversations=True)
        assert padded.input_ids.shape == (len(convs), length)
        assert padded_rows(padded) == expected  # one conversation per window, the mask marks exactly its tokens
        assert torch.equal(padded.input_ids[~padded.attention_mask.bool()],
                           torch.full_like(padded.input_ids[~padded.attention_mask.bool()], tokenizer.pad_token_id))
        packed = load_calibration(form, tokenizer, 4, 12, seed=2)
        first = load_calibration(forms[0], tokenizer, 4, 12, seed=2)
        assert torch.equal(packed.input_ids, first.input_ids) and bool(packed.attention_mask.all())


def test_packed_windows_start_at_conversation_starts_and_follow_the_stream():
    tokenizer, convs = chat_tokenizer(), conversations()
    calib = load_calibration(convs, tokenizer, len(convs), 20, seed=5)
    starts = {tuple(rendered(tokenizer, c)[:3]) for c in convs}
    assert all(tuple(row[:3].tolist()) in starts for row in calib.input_ids)
    assert all(row[0] == 3 for row in calib.input_ids)  # the template's opening: <|user|>
    assert not torch.equal(calib.input_ids, load_calibration(convs, tokenizer, len(convs), 20, seed=6).input_ids)


def test_conversation_errors_are_clear(tmp_path):
    tokenizer = chat_tokenizer()
    with pytest.raises(ConversationError, match="needs 'role' and 'content'"):
        load_calibration([[{"speaker": "me", "text": "w1"}]], tokenizer, 1, 4)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "w1"}]}) + "\n"
                                        + json.dumps({"text": "w2"}) + "\n")
    with pytest.raises(ConversationError, match="record 2 has no 'messages'"):
        load_calibration(str(tmp_path / "bad.jsonl"), tokenizer, 1, 4)
    with pytest.raises(ConversationError, match="needs a tokenizer with a chat template"):
        load_calibration(conversations(), chat_tokenizer(template=False), 2, 8)
    with pytest.raises(CalibrationError, match="6 conversations for num_samples=8 padded"):
        load_calibration(conversations(), tokenizer, 8, 8, pad_conversations=True)
    assert conversations_from(["w1 w2", "w3"]) is None  # plain texts stay texts


class OneByOne:
    """The same sequences as ``calib``, each alone in its batch, without padding."""

    def __init__(self, calib: CalibrationData):
        self.rows = [ids[mask.bool()][None] for ids, mask in zip(calib.input_ids, calib.attention_mask)]

    @property
    def num_tokens(self) -> int:
        return sum(row.shape[1] for row in self.rows)

    def model_batches(self, batch_size):
        for row in self.rows:
            yield {"input_ids": row, "attention_mask": torch.ones_like(row), "use_cache": False}, None


def site_moments(model, calib) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Every site's (covariance, mean, token count) through the engine's own statistics pass."""
    config = PruneConfig(targets=["mlp", "heads"], batch_size=len(getattr(calib, "input_ids", [0])), progress=False)
    engine = StreamingEngine(model, get_adapter(model.config), config, get_method("snp"), torch.device("cpu"),
                             torch.device("cpu"))
    stream, result = BlockStream(engine, calib, "statistics"), []
    for visit in stream:
        stats = engine.gather_statistics(visit.block, engine.sites(visit.block, visit.index), stream.inputs, True)
        result += [(*s.moments(centered=True), s.count) for s in stats]
    return result


def test_padding_never_enters_the_statistics():
    tokenizer, model = chat_tokenizer(), tiny_llama()
    padded = load_calibration(conversations(), tokenizer, 6, 48, seed=0, pad_conversations=True)
    assert not bool(padded.attention_mask.all())
    garbage = padded.input_ids.clone()
    garbage[~padded.attention_mask.bool()] = torch.randint(7, 96, (int((~padded.attention_mask.bool()).sum()),))
    alone = site_moments(model, OneByOne(padded))
    for calib in (padded, CalibrationData(garbage, padded.attention_mask, "garbage padding")):
        for (cov, mu, count), (cov1, mu1, count1) in zip(site_moments(model, calib), alone):
            assert count == count1 == padded.num_tokens
            torch.testing.assert_close(cov, cov1, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mu, mu1, rtol=1e-5, atol=1e-6)


def test_pruning_ignores_what_the_padding_holds():
    tokenizer = chat_tokenizer()
    padded = load_calibration(conversations(), tokenizer, 6, 48, seed=0, pad_conversations=True)
    garbage = padded.input_ids.clone()
    garbage[~padded.attention_mask.bool()] = 50
    a = prune_quiet(tiny_llama(), calibration=padded, sparsity=0.3, batch_size=3).model
    b = prune_quiet(tiny_llama(), calibration=CalibrationData(garbage, padded.attention_mask, "x"), sparsity=0.3,
                    batch_size=3).model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_chat_turns_and_stop_tokens_come_from_the_template():
    tokenizer = chat_tokenizer()
    turns = ChatTurns.of(tokenizer)
    assert (turns.first_user, turns.user_to_assistant, turns.assistant_to_user) == ([3], [6, 4], [6, 3])
    assert stop_ids(tokenizer) == [2, 6]  # EOS, and the special token that closes a user message


def test_self_calibration_is_reproducible_from_its_seed_and_writes_conversations():
    tokenizer, model = chat_tokenizer(), tiny_llama()
    a = self_calibration(model, tokenizer, 5, 24, seed=1, batch_size=2, progress=False)
    b = load_calibration("self", tokenizer, 5, 24, seed=1, model=model, batch_size=2)
    c = self_calibration(model, tokenizer, 5, 24, seed=2, batch_size=2, progress=False)
    assert a.input_ids.shape == (5, 24) and bool(a.attention_mask.all()) and a.generation_seconds > 0
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    for row in a.input_ids.tolist():
        assert row[0] == 3  # the template opens every window with a user turn ...
        header = next((i for i in range(len(row) - 1) if row[i : i + 2] == [6, 4]), None)
        assert header is not None and 1 <= header <= 1 + 8  # ... of at most 8 tokens here, closed, then a reply


def test_self_calibration_without_a_template_continues_from_bos():
    model = tiny_llama()
    calib = self_calibration(model, chat_tokenizer(template=False), 3, 16, seed=0, batch_size=3, progress=False)
    assert calib.input_ids.shape == (3, 16) and calib.input_ids[:, 0].tolist() == [1, 1, 1]
    assert "BOS" in calib.source


def test_self_calibration_needs_the_model():
    assert needs_model("self") and needs_model({"self": 1, "wikitext2-local": 1})
    assert needs_model(["chat-local", "self"])
    assert not needs_model("wikitext2") and not needs_model(["self text", "more"]) and not needs_model(torch.ones(1, 2))
    with pytest.raises(CalibrationError, match="made after the weights load"):
        load_calibration("self", chat_tokenizer(), 2, 8)


def test_mixture_gives_each_source_its_share_of_windows():
    tokenizer, model = chat_tokenizer(), tiny_llama()
    mixed = load_calibration({"self": 3, "wikitext2-local": 1}, tokenizer, 8, 16, seed=4, model=model)
    assert mixed.input_ids.shape == (8, 16) and mixed.source.startswith("mixture of self")
    opening = mixed.input_ids[:, 0].tolist()  # self windows open with <|user|> (3); WikiText's words are unknown (0)
    assert sorted(opening) == [0, 0] + [3] * 6 and opening != sorted(opening)  # 6 + 2 windows, mixed in order
    self_part = load_calibration("self", tokenizer, 6, 16, seed=4, model=model)
    assert padded_rows(self_part) == {tuple(row.tolist()) for row in mixed.input_ids if row[0] == 3}
    listed = load_calibration(["chat-local", "self"], tokenizer, 4, 16, seed=4, model=model)
    assert listed.input_ids.shape == (4, 16) and "chat-local" in listed.source
    assert window_counts([0.5, 0.5], 7) == [4, 3] and window_counts([0.9, 0.1], 4) == [3, 1]
    with pytest.raises(CalibrationError, match="positive shares"):
        load_calibration({"self": 0, "wikitext2-local": 1}, tokenizer, 4, 16, model=model)
