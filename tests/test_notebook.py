"""The quickstart notebook runs top to bottom (on the tiny model)."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SNP_QUICKSTART_TINY", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "max logit difference" in outputs and "LlamaForCausalLM" in outputs
    assert os.path.exists(tmp_path / "quickstart_report.png")
    assert os.path.exists(tmp_path / "smollm2-snp30-quickstart" / "hf_snp_report.json")
