"""lm-eval on in-memory or saved pruned models, with an offline WikiText-2 task."""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from ..setup.calibration import packaged_text


def wikitext_pages() -> list[str]:
    """The packaged WikiText-2 test split cut into its articles (the document-level dataset's pages)."""
    text = packaged_text("wikitext2-test-local")
    starts = [m.start() for m in re.finditer(r"^ = [^=\n].* = \r?\n", text, flags=re.MULTILINE)]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]


def wikitext_local_task() -> dict[str, Any]:
    """lm-eval's ``wikitext`` task (same processing and metrics) over the packaged test text."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    folder = os.path.join(tempfile.gettempdir(), "hf_snp_lm_eval")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "wikitext2_test_pages.jsonl")
    if not os.path.exists(path):
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            for page in wikitext_pages():
                handle.write(json.dumps({"page": page}) + "\n")
        os.replace(path + ".tmp", path)
    return {
        "task": "wikitext_local",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": path}},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": wikitext_detokenizer,
        "process_results": process_results,
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {"version": 2.0},
    }


LOCAL_TASKS = {"wikitext_local": wikitext_local_task}


def lm_eval(
    model_or_dir: Any,
    tasks: list[str | dict],
    tokenizer: Any = None,
    batch_size: int = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    max_length: int | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> dict:
    """Run ``lm_eval.simple_evaluate`` on an in-memory HFLM; returns lm-eval's ``results`` dict.

    ``model_or_dir`` is a PreTrainedModel or a saved directory (either save format; the hf_snp
    type loads through ``import hf_snp``). ``tasks`` are lm-eval task names, task config dicts,
    or ``wikitext_local`` (lm-eval's wikitext over the packaged test split, offline);
    ``include_path`` adds a folder of task YAML files.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = model_or_dir
    if isinstance(model_or_dir, str):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, trust_remote_code=trust_remote_code).eval()
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_or_dir)
    if tokenizer is None:
        raise ValueError("lm_eval needs the tokenizer of an in-memory model: pass tokenizer=...")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    task_list = [LOCAL_TASKS[t]() if isinstance(t, str) and t in LOCAL_TASKS else t for t in tasks]
    output = simple_evaluate(model=lm, tasks=task_list, task_manager=TaskManager(include_path=include_path),
                             limit=limit, num_fewshot=num_fewshot, log_samples=False, **kwargs)
    return output["results"]
