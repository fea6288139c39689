"""lm-eval on pruned models: a local task over local data, both save formats, and wikitext offline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, VOCAB, prune_quiet
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hf_snp
from hf_snp.cli import main
from hf_snp.evaluation.harness import lm_eval, wikitext_pages

WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")


@pytest.fixture(scope="module", autouse=True)
def one_task_index():
    """lm-eval's TaskManager parses every task YAML lm-eval ships (about 14,000 files) each time it is built: most
    of an lm_eval call on these tiny models. Build it once per include path for this module; hf_snp's harness still
    builds it with the same arguments, and each simple_evaluate still loads its tasks and data afresh. The
    environment report (pip list and other subprocesses) goes into the part of lm-eval's output that the harness
    drops, so it is skipped here."""
    import lm_eval.evaluator
    import lm_eval.tasks

    real, built = lm_eval.tasks.TaskManager, {}

    def shared(include_path=None, **kwargs):
        key = repr((include_path, sorted(kwargs.items())))
        if key not in built:
            built[key] = real(include_path=include_path, **kwargs)
        return built[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_eval.tasks, "TaskManager", shared)
        patch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        yield


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A multiple-choice task in a task YAML that points at a local JSONL file (one per module: one task index)."""
    tmp_path = tmp_path_factory.mktemp("local_task")
    rows = [{"question": " ".join(WORDS[i : i + 5]),
             "choices": [WORDS[(i + 5) % 90], WORDS[(i + 40) % 90], WORDS[(i + 70) % 90]], "answer": 0}
            for i in range(0, 60, 3)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_local_mc.yaml").write_text(
        "task: tiny_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return str(tmp_path / "tasks")


def test_local_task_on_in_memory_and_saved_models_in_both_formats(tmp_path, local_task):
    tokenizer = tiny_tokenizer()
    for name, options in (("stock", {"allocation": "uniform"}), ("hf_snp", {"layer_sparsity": {0: 0.0}})):
        result = prune_quiet(TINY["llama"](), tokenizer=tokenizer, sparsity=0.25, output_dir=str(tmp_path / name),
                             **options)
        assert result.report["save_format"] == name
        in_memory = lm_eval(result.model, ["tiny_local_mc"], tokenizer=tokenizer, include_path=local_task)
        saved = lm_eval(str(tmp_path / name), ["tiny_local_mc"], include_path=local_task)
        acc = in_memory["tiny_local_mc"]["acc,none"]
        assert 0.0 <= acc <= 1.0 and saved["tiny_local_mc"]["acc,none"] == acc


def test_cli_eval_runs_tasks_and_perplexity_and_records_them(tmp_path, local_task, capsys):
    tokenizer = tiny_tokenizer()
    prune_quiet(TINY["opt"](), tokenizer=tokenizer, sparsity=0.3, output_dir=str(tmp_path / "out"))
    (tmp_path / "text.txt").write_text(" ".join(WORDS[(i * 7) % 90] for i in range(400)))
    code = main(["eval", str(tmp_path / "out"), "--tasks", "tiny_local_mc", "--include-path", local_task,
                 "--limit", "5", "--ppl", str(tmp_path / "text.txt"), "--seq-len", "32", "--save", "--quiet"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert "acc,none" in printed["lm_eval"]["tiny_local_mc"] and printed["perplexity"] > 1
    report = hf_snp.PruneReport.load(str(tmp_path / "out"))
    assert report["metrics"]["perplexity"] == printed["perplexity"]


def test_wikitext_pages_are_the_test_articles():
    pages = wikitext_pages()
    assert len(pages) == 62  # the document-level WikiText-2 test split has 62 articles
    assert pages[0].startswith(" = Robert Boulter = ") and all(p.startswith(" = ") for p in pages)


@pytest.mark.slow
def test_real_wikitext_task_on_smollm2_offline(tmp_path):
    from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer

    source = demo_model_source()
    model, tokenizer = load_model(source, dtype=torch.float32), load_tokenizer(source)
    results = lm_eval(model, ["wikitext_local"], tokenizer=tokenizer, limit=2, max_length=2048)
    word_ppl = results["wikitext_local"]["word_perplexity,none"]
    print(f"SmolLM2 lm-eval wikitext (first 2 test articles): word perplexity {word_ppl:.2f}")
    assert math.isfinite(word_ppl) and 5 < word_ppl < 200
