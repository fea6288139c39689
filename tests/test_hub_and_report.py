"""Model card, push to the Hub (network boundary replaced), the report's table and plots."""

from __future__ import annotations

import json
import os

import huggingface_hub
import pytest
import yaml
from conftest import TINY, prune_quiet

from hf_snp.cli import main
from hf_snp.deliver.card import model_card
from hf_snp.deliver.report import PruneReport


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls and the files an upload would send."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        FakeHub.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None):
        files = sorted(os.listdir(folder_path))
        card = open(os.path.join(folder_path, "README.md")).read()
        FakeHub.calls.append(("upload_folder", repo_id, files, commit_message, card))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1",
                                          commit_message=commit_message, commit_description="", oid="1", pr_url=None)


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_metadata_and_summary():
    report = PruneReport(base_model="HuggingFaceTB/SmolLM2-135M", method="snp", sparsity=0.3, targets=["mlp", "heads"],
                         params_before=134_515_008, params_after=110_616_768, calibration="wikitext2",
                         save_format="hf_snp",
                         layers=[{"layer": 0, "mlp_width": 1075, "num_heads": 6, "num_kv_heads": 3},
                                 {"layer": 1, "mlp_width": 900, "num_heads": 6, "num_kv_heads": 3}],
                         metrics={"perplexity_before": 33.92, "perplexity_after": 61.66})
    card = model_card(report, "user/smol-pruned")
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["library_name"] == "transformers"
    assert {"hf_snp", "pruning", "snp"} <= set(meta["tags"])
    assert meta["base_model_relation"] == "pruned" and "license" not in meta  # no license known: none claimed
    assert "# SmolLM2-135M, 30% of MLP neurons and attention heads removed with SNP\n" in card
    assert "repo = 'user/smol-pruned'" in card and "134,515,008 -> 110,616,768" in card
    assert "| MLP width | 1075, 900 |" in card and "| query heads | 6 in every layer |" in card
    assert "| perplexity, dense -> pruned | 33.92 -> 61.66 |" in card
    assert "trust_remote_code=True" in card  # hf_snp format
    stock = model_card(PruneReport({**report, "save_format": "stock", "base_model": "/local/dir"}))
    assert "trust_remote_code" not in stock and "base_model" not in front_matter(stock)


def test_prune_push_to_hub_uploads_a_complete_checkpoint(fake_hub):
    result = prune_quiet(TINY["llama"](), sparsity=0.25, layer_sparsity={0: 0.0}, push_to_hub="user/tiny-pruned",
                         private=True)
    assert fake_hub.calls[0] == ("create_repo", "user/tiny-pruned", True)
    _, repo, files, message, card = fake_hub.calls[1]
    assert repo == "user/tiny-pruned" and message.startswith("hf_snp: snp 25% of mlp")
    for name in ("config.json", "model.safetensors", "modeling_hf_snp.py", "hf_snp_report.json", "README.md"):
        assert name in files
    assert "repo = 'user/tiny-pruned'\n" in card and result.report["save_format"] == "hf_snp"


def test_cli_push_of_a_saved_folder(fake_hub, tmp_path, capsys):
    prune_quiet(TINY["opt"](), sparsity=0.3, output_dir=str(tmp_path / "out"))
    assert main(["push", str(tmp_path / "out"), "user/opt-tiny"]) == 0
    assert "https://huggingface.co/user/opt-tiny/commit/1" in capsys.readouterr().out
    assert fake_hub.calls[0] == ("create_repo", "user/opt-tiny", False)
    assert main(["push", str(tmp_path), "user/x"]) == 2  # not an hf_snp checkpoint
    assert "is not a checkpoint saved by hf_snp" in capsys.readouterr().err


def test_a_bad_repo_id_fails_before_pruning():
    with pytest.raises(ValueError, match="should be a repository id like 'user/name'"):
        prune_quiet(TINY["llama"](), push_to_hub="no-namespace")


def test_saved_report_schema_table_and_plot(tmp_path, capsys):
    prune_quiet(TINY["llama"](), targets=("mlp", "heads"), sparsity=0.5, allocation="uniform",
                output_dir=str(tmp_path / "out"))
    report = PruneReport.load(str(tmp_path / "out"))
    assert report["schema_version"] == 1
    for key in ("hf_snp_version", "base_model", "model_type", "save_format", "method", "sparsity", "targets",
                "calibration", "calibration_tokens", "params_before", "params_after", "params_removed", "layers",
                "timings_s", "metrics"):
        assert key in report, key
    assert set(report["layers"][0]) >= {"layer", "mlp_width_before", "mlp_width", "num_heads_before", "num_heads",
                                        "num_kv_heads"}
    assert main(["report", str(tmp_path / "out"), "--plots", str(tmp_path / "r.png")]) == 0
    table = capsys.readouterr().out
    assert "snp, sparsity 50% of mlp, heads" in table and "48 -> 24" in table and "4 -> 2" in table
    assert open(tmp_path / "r.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    card = open(tmp_path / "out" / "README.md").read()
    assert front_matter(card)["library_name"] == "transformers"


def test_the_card_never_names_a_local_path(tmp_path):
    """A model loaded from a directory (or passed in, its _name_or_path a directory) has no Hub id: the card
    names it by its model type and writes no base_model, and 'How to load' shows the repository after a push."""
    TINY["llama"]().save_pretrained(tmp_path / "dense")
    tokenizer_dir = tmp_path / "dense"
    result = prune_quiet(str(tokenizer_dir), sparsity=0.25, output_dir=str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(tmp_path) not in card and "base_model" not in front_matter(card)
    assert result.report["base_model"] is None and result.report["model_name"] == "llama"
    assert "# llama, 25% of MLP neurons removed with SNP\n" in card and "repo = 'out'  # this folder" in card
    pushed = model_card(result.report, "user/x")
    assert "repo = 'user/x'\n" in pushed


def test_base_model_from_the_option_the_config_or_gguf_metadata(tmp_path, monkeypatch):
    import hf_snp.setup.loading as loading
    from hf_snp.setup.loading import ModelSource, model_names

    model = TINY["llama"]()
    model.config._name_or_path = "org/tiny-llama"  # as from_pretrained("org/tiny-llama") sets it
    result = prune_quiet(model, sparsity=0.25)
    assert result.report["base_model"] == "org/tiny-llama"
    assert front_matter(model_card(result.report))["base_model"] == "org/tiny-llama"
    explicit = prune_quiet(TINY["llama"](), sparsity=0.25, base_model="org/named")
    assert explicit.report["base_model"] == "org/named"
    local = ModelSource(str(tmp_path), "m.gguf")
    config = TINY["llama"]().config
    metadata = {"general.base_model.0.repo_url": "https://huggingface.co/org/base-model", "general.name": "Base"}
    monkeypatch.setattr(loading, "_gguf_metadata", lambda source: metadata)
    assert model_names(local, config) == ("org/base-model", "org/base-model")
    monkeypatch.setattr(loading, "_gguf_metadata", lambda source: {"general.name": "Base"})
    assert model_names(local, config) == (None, "Base")
    assert model_names(loading.demo_model_source(), config)[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
