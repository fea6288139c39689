"""Recipes: every shipped recipe is valid; unknown keys fail; explicit arguments override."""

from __future__ import annotations

import glob
import json
import os

import pytest
import yaml
from conftest import TINY, calibration_ids

import hf_snp
from hf_snp.api import prune
from hf_snp.cli import main
from hf_snp.config import PruneConfig
from hf_snp.setup.recipes import RecipeError, load_recipe, recipe_fields

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "*.yaml")))
CONFIG_FIELDS = set(PruneConfig.__dataclass_fields__)


def test_there_are_recipes_for_each_family():
    names = " ".join(os.path.basename(r) for r in RECIPES)
    for family in ("opt", "llama", "smollm2", "qwen2", "mistral", "deit"):
        assert family in names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_its_settings_validate(path):
    recipe = load_recipe(path, recipe_fields(prune))
    assert isinstance(recipe["model"], str) and recipe.get("output_dir")
    PruneConfig(**{k: v for k, v in recipe.items() if k in CONFIG_FIELDS}).validate()


def test_unknown_recipe_keys_are_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: x\nmethod: snp\nsparsty: 0.3\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key\(s\) \['sparsty'\]; allowed keys: \[.*'sparsity'"):
        hf_snp.prune(recipe=str(tmp_path / "bad.yaml"))
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        hf_snp.prune(recipe=["not", "a", "mapping"])
    assert main(["prune", "--recipe", str(tmp_path / "bad.yaml")]) == 2


def test_explicit_arguments_override_the_recipe(tmp_path):
    TINY["llama"]().save_pretrained(tmp_path / "dense")
    recipe = {"model": str(tmp_path / "dense"), "method": "vbp", "sparsity": 0.5, "targets": ["mlp"], "batch_size": 4,
              "output_dir": str(tmp_path / "from-recipe")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = hf_snp.prune(recipe=str(tmp_path / "r.yaml"), calibration=calibration_ids(), sparsity=0.25, progress=False)
    assert result.report["method"] == "vbp" and result.report["sparsity"] == 0.25
    assert os.path.exists(tmp_path / "from-recipe" / "config.json")


def test_cli_recipe_with_overrides(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(90)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    TINY["opt"]().save_pretrained(tmp_path / "dense")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "dense")
    (tmp_path / "calib.txt").write_text(" ".join(words[i % 90] for i in range(2000)))
    recipe = {"model": str(tmp_path / "dense"), "method": "vbp", "sparsity": 0.5,
              "calibration": str(tmp_path / "calib.txt"), "num_samples": 4, "seq_len": 32,
              "output_dir": str(tmp_path / "recipe-out")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["prune", "--recipe", str(tmp_path / "r.yaml"), "--method", "snp", "--out", str(tmp_path / "cli"),
                 "--quiet", "--plots"]) == 0
    report = json.load(open(tmp_path / "cli" / "hf_snp_report.json"))
    assert (report["method"], report["sparsity"], report["seq_len"]) == ("snp", 0.5, 32)
    assert os.path.exists(tmp_path / "cli" / "hf_snp_report.png")
    assert not os.path.exists(tmp_path / "recipe-out")


@pytest.mark.slow
def test_the_smollm2_recipe_runs(tmp_path):
    result = hf_snp.prune(recipe=os.path.join(os.path.dirname(__file__), "..", "recipes", "smollm2-135m-snp-30.yaml"),
                          output_dir=str(tmp_path / "out"), num_samples=2, seq_len=128, calibration="wikitext2-local",
                          progress=False, allocation="uniform")
    width = result.report["layers"][0]["mlp_width"]  # 70% of 1536 is 1075.2: rounded up to a multiple of 8
    assert width % 8 == 0 and 0 <= width - 1075 < 8
