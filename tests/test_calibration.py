"""Calibration sources: files, lists, datasets, tensors, Hub names (network boundary replaced), seeds."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hf_snp.setup.datasets
from hf_snp.setup.calibration import CalibrationError, load_calibration, packaged_text

WORDS = [f"w{i}" for i in range(50)]


@pytest.fixture
def tokenizer():
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def text(n: int = 400) -> str:
    return " ".join(WORDS[(i * 7) % 50] for i in range(n))


def test_windows_are_drawn_reproducibly_from_the_seed(tokenizer):
    a = load_calibration([text()], tokenizer, num_samples=6, seq_len=16, seed=0)
    b = load_calibration([text()], tokenizer, num_samples=6, seq_len=16, seed=0)
    c = load_calibration([text()], tokenizer, num_samples=6, seq_len=16, seed=1)
    assert a.input_ids.shape == (6, 16) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    stream = tokenizer(text(), return_tensors="pt").input_ids[0]
    windows = {tuple(stream[s : s + 16].tolist()) for s in range(len(stream) - 15)}
    assert all(tuple(row.tolist()) in windows for row in a.input_ids)  # contiguous windows of the text


def test_text_file_jsonl_list_and_dataset_give_the_same_tokens(tokenizer, tmp_path):
    (tmp_path / "c.txt").write_text(text())
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": text()}) + "\n\n")
    (tmp_path / "s.jsonl").write_text(json.dumps(text()) + "\n")
    sources = [str(tmp_path / "c.txt"), str(tmp_path / "c.jsonl"), str(tmp_path / "s.jsonl"), [text()],
               datasets.Dataset.from_dict({"text": [text()], "label": [0]})]
    results = [load_calibration(s, tokenizer, num_samples=4, seq_len=32, seed=3).input_ids for s in sources]
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_jsonl_record_without_text_field(tokenizer, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(CalibrationError, match=r"bad.jsonl:1: a JSONL record needs a 'text' field"):
        load_calibration(str(tmp_path / "bad.jsonl"), tokenizer, 1, 4)


def test_token_tensor_is_used_as_given():
    ids = torch.randint(0, 50, (3, 10))
    calib = load_calibration(ids, None, num_samples=128, seq_len=2048)
    assert torch.equal(calib.input_ids, ids) and calib.num_tokens == 30


def test_wikitext2_falls_back_to_the_packaged_text_offline(tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(hf_snp.setup.datasets, "hub_reachable", lambda: False)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="hf_snp"):
        calib = load_calibration("wikitext2", tokenizer, num_samples=2, seq_len=64)
    assert time.perf_counter() - start < 10
    assert "packaged WikiText-2 validation text" in caplog.text
    assert calib.input_ids.shape == (2, 64)


def test_hub_dataset_path_is_used_when_the_hub_answers(tokenizer, monkeypatch):
    calls = []

    def fake_load_dataset(path, config, split=None, data_files=None, streaming=False):
        calls.append((path, config, split, data_files))
        return datasets.Dataset.from_dict({"text": [text(), "", text(50)]})

    monkeypatch.setattr(hf_snp.setup.datasets, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    calib = load_calibration("c4", tokenizer, num_samples=2, seq_len=16)
    assert calls == [("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"})]
    assert calib.source.startswith("c4")
    load_calibration("wikitext2", tokenizer, num_samples=2, seq_len=16)
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", "train", None)


def test_c4_offline_says_what_to_do(tokenizer, monkeypatch):
    monkeypatch.setattr(hf_snp.setup.datasets, "hub_reachable", lambda: False)
    with pytest.raises(CalibrationError, match="Pass a local .txt/.jsonl path"):
        load_calibration("c4", tokenizer, 2, 16)


def test_packaged_text_and_its_licence_notice_ship_with_the_package():
    from importlib import resources

    folder = resources.files("hf_snp").joinpath("data", "wikitext-2")
    assert "CC BY-SA 3.0" in folder.joinpath("README.md").read_text()
    digests = {  # the dataset's files, byte for byte
        "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "wiki.test.raw": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    }
    for name, digest in digests.items():
        assert hashlib.sha256(folder.joinpath(name).read_bytes()).hexdigest() == digest
    assert packaged_text("wikitext2-test-local").startswith(" = Robert Boulter = ")
