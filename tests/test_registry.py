"""The adapter registry: the README's family table is generated from it, and a family is added as data."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import run_python
from fresh_python import fresh_python
from test_save_reload import BLOCK_HF_SNP
from transformers import GPT2Config

import hf_snp
from hf_snp.adapters import adapter_for_type, support_table

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_block(name: str) -> str:
    text = open(README, encoding="utf-8").read()
    match = re.search(rf"<!-- {name}:start[^>]*-->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def test_readme_family_table_is_the_registry():
    assert readme_block("support-table").strip() == support_table().strip()


def test_every_registered_type_has_a_row_and_a_variable_width_type():
    from transformers import AutoConfig

    for row in support_table().splitlines()[2:]:
        model_type = row.split("`")[1]
        adapter = adapter_for_type(model_type)
        assert AutoConfig.for_model(f"hf_snp_{model_type}").model_type == f"hf_snp_{model_type}"
        assert adapter_for_type(f"hf_snp_{model_type}") is adapter


def test_unknown_type_names_the_supported_ones_and_the_readme_section():
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    config.model_type = "not_a_family"
    with pytest.raises(ValueError, match=r"cannot prune model_type 'not_a_family'. Supported families: .*llama.*"
                                         r"'Adding a family' in the README"):
        hf_snp.get_adapter(config)


ADD_AND_PRUNE = """
import json, torch
from transformers import Starcoder2Config, Starcoder2ForCausalLM
{readme_code}
torch.manual_seed(0)
ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
saved = {{}}
for name, options in (("uniform", {{}}), ("per_layer", {{"layer_sparsity": {{0: 0.0, 1: 0.5, 2: 0.25}}}})):
    config = Starcoder2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Starcoder2ForCausalLM(config).eval()  # a config of its own: pruning rewrites the model's config
    result = hf_snp.prune(model, targets=("mlp", "heads"), sparsity=0.25, calibration=ids, batch_size=4,
                          progress=False, output_dir=r"{out}/" + name, **options)
    with torch.no_grad():
        torch.save(result.model(ids[:2]).logits, r"{out}/" + name + ".pt")
    saved[name] = [result.report["save_format"], result.report["params_removed"],
                   [layer["mlp_width"] for layer in result.report["layers"]]]
torch.save(ids[:2], r"{out}/ids.pt")
print(json.dumps(saved))
"""


def test_a_family_added_as_in_the_readme_prunes_saves_and_reloads_without_hf_snp(tmp_path):
    code = ADD_AND_PRUNE.format(readme_code=readme_block("adding-a-family").strip().strip("`").removeprefix("python"),
                                out=tmp_path)
    saved = json.loads(run_python(code).strip().splitlines()[-1])
    assert saved["uniform"][0] == "stock" and saved["uniform"][1] > 0
    assert saved["per_layer"][0] == "hf_snp" and saved["per_layer"][2] == [48, 24, 36]
    child = fresh_python(BLOCK_HF_SNP)  # hf_snp cannot be imported there: the shipped code file does the work
    for name, kwargs in (("uniform", ""), ("per_layer", "trust_remote_code=True")):
        reply = child.reload(tmp_path / name, str(tmp_path / "ids.pt"), str(tmp_path / f"{name}.reloaded.pt"), kwargs)
        assert reply["class"] == ("Starcoder2ForCausalLM" if name == "uniform" else "HfSnpStarcoder2ForCausalLM")
        expected, got = torch.load(tmp_path / f"{name}.pt"), torch.load(tmp_path / f"{name}.reloaded.pt")
        assert torch.allclose(got, expected, atol=1e-5), name
