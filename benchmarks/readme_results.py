"""The generated parts of the documentation: the README's results table and family table, the benchmark tables
of docs/results.md, and the family list of docs/design.md §1.1, from benchmarks/results and the adapter registry.

    python benchmarks/readme_results.py            # rewrite every generated block
    python benchmarks/readme_results.py --check    # exit 1 (and name the files) when a block is out of date

A block sits between ``<!-- NAME:start ... -->`` and ``<!-- NAME:end -->``; only its inside is rewritten.
Nothing here measures anything: every number comes from a committed result file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "README.md")
RESULTS_DOC = os.path.join(ROOT, "docs", "results.md")
DESIGN = os.path.join(ROOT, "docs", "design.md")

# the README table: (row label, result file, method key of its rows); all with uniform allocation
METHOD_ROWS = (
    ("SNP, hf_snp's default (OBS order, held-out ridge)", "model_aware.jsonl", "snp obs heldout"),
    ("SNP as in the paper (ZCA order, fixed ridge)", "model_aware.jsonl", "snp"),
    ("VBP", "quality.jsonl", "vbp"),
    ("FLAP", "quality.jsonl", "flap"),
    ("Wanda-SP", "quality.jsonl", "wanda_sp"),
)
SETTINGS = (("mlp", 0.1, "MLP 10%"), ("mlp", 0.3, "MLP 30%"), ("mlp", 0.5, "MLP 50%"),
            ("mlp,heads", 0.3, "MLP + heads 30%"))
DENSE_TOLERANCE = 0.005  # as benchmarks/row_cache.py: the dense perplexity drifts in its 4th decimal

# docs/results.md: cost.py writes cost_PART.md and gathers the CPU parts into cost.md, shown once
PARTS_OF = {"cost_ratio": "cost", "cost_depth": "cost", "cost_tokens": "cost", "cost_width": "cost",
            "cost_search": "cost", "cost_search_depth": "cost"}
# what a result file says about the code version it was measured with stays in the file, not in the docs
REWRITES = (
    (re.compile(r"Pruning seconds depend on the code they were measured with \(`timed at`: its commit\); "),
     "Pruning seconds depend on the code version each row was measured with; "),
    (re.compile(r" \(commit of each row in (\w+\.jsonl)\)"), r" (each row's code version is in \1)"),
    (re.compile(r",? (hf_snp )?at commit [0-9a-f]{7,40}\+?"), ""),
    (re.compile(r";? ?(the )?default (before|until) issue \d+"), ""),
)
DROPPED_COLUMNS = ("timed at", "commit")
HISTORY = re.compile(r"\bissue \d+|\bsession\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", re.I)


def read_rows(name: str, results: str = RESULTS) -> list[dict]:
    """The records of a JSON-lines result file (protocol, key, row)."""
    with open(os.path.join(results, name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def find_row(records: list[dict], method: str, targets: str, sparsity: float) -> dict | None:
    """The record of one method at one setting with uniform allocation and the default protocol, or None."""
    for record in records:
        key, protocol = record["key"], record["protocol"]
        if (key["method"], key["targets"], key["allocation"], key["sparsity"]) == (method, targets, "uniform",
                                                                                   sparsity) \
                and "calibration" not in protocol:
            return record
    return None


def dense_parameters(name: str = "quality.md", results: str = RESULTS) -> int:
    """The dense model's parameter count, from the dense row of a result table that lists it."""
    with open(os.path.join(results, name), encoding="utf-8") as handle:
        lines = [line for line in handle if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip().strip("|").split("|")]
    for line in lines:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "dense":
            return int(cells[header.index("parameters after")].replace(",", ""))
    raise ValueError(f"benchmarks/results/{name} has no dense row")


def _same_protocol(protocols: list[dict]) -> dict:
    first = protocols[0]
    for other in protocols[1:]:
        if {k: v for k, v in other.items() if k != "dense"} != {k: v for k, v in first.items() if k != "dense"} \
                or abs(other["dense"] - first["dense"]) > DENSE_TOLERANCE:
            raise ValueError(f"the README table mixes protocols {first} and {other}: rerun the rows with one protocol")
    return first


def results_table(results: str = RESULTS) -> str:
    """The README's results table: SmolLM2-135M perplexity of each method at each setting, with parameters."""
    files = {name: read_rows(name, results) for name in {file for _, file, _ in METHOD_ROWS}}
    cells = {(label, setting): find_row(files[file], method, setting[0], setting[1])
             for label, file, method in METHOD_ROWS for setting in SETTINGS}
    found = [record for record in cells.values() if record is not None]
    protocol = _same_protocol([record["protocol"] for record in found])
    best = {setting: min((r["row"]["ppl"] for (_, s), r in cells.items() if s == setting and r), default=None)
            for setting in SETTINGS}
    lines = ["| method | " + " | ".join(title for *_, title in SETTINGS) + " |",
             "| --- |" + " ---: |" * len(SETTINGS)]
    for label, _, _ in METHOD_ROWS:
        row = []
        for setting in SETTINGS:
            record = cells[(label, setting)]
            if record is None:
                row.append("–")
                continue
            ppl = f"{record['row']['ppl']:.2f}"
            row.append(f"{f'**{ppl}**' if record['row']['ppl'] == best[setting] else ppl} "
                       f"({record['row']['params'] / 1e6:.1f}M)")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    tokens = f"{protocol['windows']} × {protocol['seq_len']}"
    dense = f"{protocol['dense']:.2f} with {dense_parameters(results=results) / 1e6:.1f}M parameters"
    lines += ["", f"WikiText-2 perplexity of SmolLM2-135M-Instruct (float32; lower is better; dense {dense}), in "
              "brackets the parameters left. Calibration: the "
              f"first {tokens} tokens of the WikiText-2 validation text; evaluation: the first {tokens} tokens of the "
              "test text. Uniform allocation: every layer loses the same fraction of the targeted modules' "
              "parameters. Generated by `python benchmarks/readme_results.py` from "
              + " and ".join(f"`benchmarks/results/{name}`" for name in sorted(files)) + "."]
    if len(found) < len(cells):
        missing = [f"{label} at {title}" for (label, (*_, title)), record in cells.items() if record is None]
        lines += ["", f"–: no committed result ({'; '.join(missing)}); `python benchmarks/quality.py` (the whole "
                  "grid; finished rows are kept) measures it."]
    return "\n".join(line if line.startswith("|") else textwrap.fill(line, 115, break_on_hyphens=False)
                     for line in lines)


def family_list() -> str:
    """docs/design.md §1.1: every family of the adapter registry, its model types and prunable structures."""
    from hf_snp.adapters import support_table

    families: dict[str, tuple[list[str], list[str]]] = {}
    header, _, *rows = support_table().splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        types, targets = families.setdefault(cells[1], ([], []))
        types.append(cells[0])
        for column, cell in zip(columns[2:6], cells[2:6]):
            if cell == "yes" and column not in targets:
                targets.append(column)
    return "\n".join(f"* {family}: {', '.join(types)} ({', '.join(targets)})"
                     for family, (types, targets) in sorted(families.items()))


def _drop_columns(table: list[str]) -> list[str]:
    header = [cell.strip() for cell in table[0].strip().strip("|").split("|")]
    keep = [i for i, name in enumerate(header) if name not in DROPPED_COLUMNS]
    if len(keep) == len(header):
        return table
    return ["| " + " | ".join(line.strip().strip("|").split("|")[i].strip() for i in keep) + " |"
            for line in table]


def clean_result(text: str, name: str = "result") -> str:
    """A result file as docs/results.md shows it: headings two levels down, no column or phrase that names a
    commit or an issue. Raises when such a name is left (then add a rule to REWRITES)."""
    lines, table, out = text.strip().splitlines(), [], []
    for line in lines + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        out += _drop_columns(table) if table else []
        table = []
        out.append("##" + line if line.startswith("#") else line)
    text = "\n".join(out).strip()
    for pattern, replacement in REWRITES:
        text = pattern.sub(replacement, text)
    left = HISTORY.search(text)
    if left:
        raise ValueError(f"benchmarks/results/{name}.md still names {left.group(0)!r} after cleaning: "
                         "add a rule to REWRITES in benchmarks/readme_results.py")
    return text


def result_names(results: str = RESULTS) -> list[str]:
    """The result files docs/results.md shows (cost.md's parts are shown as part of cost.md)."""
    return sorted(name[:-3] for name in os.listdir(results) if name.endswith(".md") and name[:-3] not in PARTS_OF)


def replace_block(text: str, name: str, body: str, path: str = "") -> str:
    """``text`` with the inside of its ``name`` block replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {re.escape(name)}:start[^>]*-->\n)(.*?)(<!-- {re.escape(name)}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{path or 'the text'} has no '<!-- {name}:start -->' ... '<!-- {name}:end -->' block")
    return pattern.sub(lambda match: match.group(1) + body.strip() + "\n" + match.group(3), text, count=1)


def results_doc(text: str, results: str = RESULTS) -> str:
    """docs/results.md with its blocks rewritten: the summary table, one block per result file, and the
    files that have no block of their own in 'bench:other'."""
    text = replace_block(text, "results", results_table(results), RESULTS_DOC)
    other = []
    for name in result_names(results):
        with open(os.path.join(results, f"{name}.md"), encoding="utf-8") as handle:
            body = clean_result(handle.read(), name)
        if f"<!-- bench:{name}:start" in text:
            text = replace_block(text, f"bench:{name}", body, RESULTS_DOC)
        else:
            other.append(f"From `benchmarks/results/{name}.md`:\n\n{body}")
    return replace_block(text, "bench:other", "\n\n".join(other) or "(none)", RESULTS_DOC)


def rendered(results: str = RESULTS) -> dict[str, str]:
    """Every documentation file this script writes, as it would write it."""
    from hf_snp.adapters import support_table

    def read(path: str) -> str:
        with open(path, encoding="utf-8") as handle:
            return handle.read()

    readme = replace_block(read(README), "results", results_table(results), README)
    readme = replace_block(readme, "support-table", support_table(), README)
    design = replace_block(read(DESIGN), "families", family_list(), DESIGN)
    return {README: readme, RESULTS_DOC: results_doc(read(RESULTS_DOC), results), DESIGN: design}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                continue
        stale.append(os.path.relpath(path, ROOT))
        if not args.check:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python benchmarks/readme_results.py", file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(stale)) if stale and not args.check else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
