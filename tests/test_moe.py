"""Mixtures of experts (issue 14): Mixtral, Qwen2-MoE (with its shared expert, and dense layers), Qwen3-MoE.

Tiny from-config models (hidden 32, 2 layers, 4 experts, top-2, expert width 16, 4 heads on 2 KV heads): each
routed expert's neurons removed exactly where they are planted copies (every expert, and the shared expert),
0% is the identity, parameter counts, whole experts removed by routed-output energy (a planted zero-output expert
goes first; the ranking equals a brute-force one) with a router that still routes, budgets refused before any
work, resume, and save/reload in fresh processes: uniform results as the stock class without hf_snp, per-layer
widths and expert counts as the hf_snp type without hf_snp (trust_remote_code) and with it, greedy generation
equal to the in-memory pruned model's."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, calibration_ids, eval_ids, logits, prune_quiet

import hf_snp
from hf_snp.adapters import get_adapter
from hf_snp.units.experts import ExpertSetSite, ExpertSite, SharedExpertSite
from hf_snp.units.sites import count_parameters

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
STOCK_CLASS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM"}
WIDTH_FIELD = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
               "qwen3_moe": "moe_intermediate_size"}
COUNT_FIELD = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_local_experts"}
HIDDEN, WIDTH, EXPERTS, TOP_K = 32, 16, 4, 2
COPIES = 8  # of 16 units per expert (expert widths are multiples of 8): sparsity 0.5 of "mlp" removes exactly them
PROMPT = [[3, 4, 5, 6]]
NEW_TOKENS = 8
BLOCK_HF_SNP = "sys.modules['hf_snp'] = None  # import hf_snp now raises ImportError"


def tiny_moe(family: str, seed: int = 0, layers: int = 2, **fields):
    """hidden 32, ``layers`` layers, 4 routed experts of width 16, top-2, 4 query heads on 2 KV heads, vocab 96;
    Qwen2-MoE has a shared expert of width 16 (and dense layers of width 24 where ``mlp_only_layers`` says).
    Norm weights get noise so that they matter."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=TOP_K, max_position_embeddings=64,
                  initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **fields)
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=WIDTH, num_local_experts=EXPERTS, **common))
    elif family == "qwen2_moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=WIDTH,
                                                   shared_expert_intermediate_size=WIDTH, num_experts=EXPERTS,
                                                   **common))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=WIDTH,
                                                   num_experts=EXPERTS, head_dim=8, **common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def sites_of(model, targets=("mlp",)):
    adapter = get_adapter(model.config)
    return [site for index, layer in enumerate(adapter.layers(model))
            for site in adapter.sites(layer, index, targets, model.config, "per_group")]


@torch.no_grad()
def plant_copies(model, copies: int = COPIES) -> None:
    """In every routed expert (and the shared expert), units 8..15 become positive multiples of units 0..7:
    the same gate row, the up row times c, so h_dst = c h_src for every token."""
    for site in sites_of(model):
        for k in range(copies):
            src, dst, scale = k, site.num_units - copies + k, 0.5 + 0.125 * k
            if isinstance(site, ExpertSite):
                gate_up, width = site.moe.experts.gate_up_proj[site.expert], site.num_units
                gate_up[dst] = gate_up[src]
                gate_up[width + dst] = scale * gate_up[width + src]
            else:
                gate, up = site.producer_linears
                gate.weight[dst] = gate.weight[src]
                up.weight[dst] = scale * up.weight[src]


def expert_modules(model):
    return [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]


# ---------------------------------------------------------------------------------------------- expert neurons


@pytest.mark.parametrize("family", FAMILIES)
def test_snp_expert_neurons_exact_when_removed_neurons_are_scaled_copies(family):
    model = tiny_moe(family)
    plant_copies(model)
    reference = logits(model)
    result = prune_quiet(copy.deepcopy(model), method="snp", sparsity=COPIES / WIDTH)
    layers = result.report["layers"]
    assert [layer["expert_width"] for layer in layers] == [WIDTH - COPIES] * 2
    if family == "qwen2_moe":
        assert [layer["shared_expert_width"] for layer in layers] == [WIDTH - COPIES] * 2
    assert result.report["save_format"] == "stock"
    for experts in expert_modules(result.model):
        assert experts.gate_up_proj.shape == (EXPERTS, 2 * (WIDTH - COPIES), HIDDEN)
        assert experts.down_proj.shape == (EXPERTS, HIDDEN, WIDTH - COPIES)
        assert experts.intermediate_dim == WIDTH - COPIES
    assert getattr(result.model.config, WIDTH_FIELD[family]) == WIDTH - COPIES
    assert (logits(result.model) - reference).abs().max() < 1e-4
    if family == "mixtral":  # not vacuous: random choices are not exact
        baseline = prune_quiet(model, method="random", sparsity=COPIES / WIDTH)
        assert (logits(baseline.model) - reference).abs().max() > 1e-2


def test_every_expert_chooses_its_own_units():
    """Expert e's copies pair unit (4e + k) mod 16 with unit (4e + 8 + k) mod 16, k < 8 (another pairing in each
    expert): each expert keeps exactly one unit of each of its own pairs."""
    model = tiny_moe("mixtral")
    pairs = {e: [((4 * e + k) % WIDTH, (4 * e + 8 + k) % WIDTH) for k in range(COPIES)] for e in range(EXPERTS)}
    with torch.no_grad():
        for experts in expert_modules(model):
            for expert, planted in pairs.items():
                for dst, src in planted:
                    experts.gate_up_proj[expert, dst] = experts.gate_up_proj[expert, src]
                    experts.gate_up_proj[expert, WIDTH + dst] = 0.75 * experts.gate_up_proj[expert, WIDTH + src]
    reference = logits(model)
    before = expert_modules(model)[0].gate_up_proj.detach().clone()
    result = prune_quiet(model, method="snp", sparsity=COPIES / WIDTH)
    assert (logits(result.model) - reference).abs().max() < 1e-4
    after = expert_modules(result.model)[0].gate_up_proj  # layer 0: its statistics come from the dense inputs
    kept_width = WIDTH - COPIES
    for expert, planted in pairs.items():
        kept = [torch.cat([after[expert, i], after[expert, kept_width + i]]) for i in range(kept_width)]

        def present(unit: int) -> bool:
            row = torch.cat([before[expert, unit], before[expert, WIDTH + unit]])
            return any(torch.equal(row, k) for k in kept)

        assert [present(dst) + present(src) for dst, src in planted] == [1] * COPIES, expert


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_sparsity_is_the_identity(family):
    model = tiny_moe(family)
    reference = logits(model)
    dense = count_parameters(model)
    result = prune_quiet(model, targets=("mlp", "heads", "experts"), sparsity=0.0)
    assert torch.equal(logits(result.model), reference)
    assert result.report["params_removed"] == 0 and count_parameters(result.model) == dense
    assert result.report["save_format"] == "stock"
    for layer in result.report["layers"]:
        assert (layer["expert_width"], layer["num_experts"], layer["num_heads"]) == (WIDTH, EXPERTS, 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_equal_the_report(family):
    model = tiny_moe(family)
    dense = count_parameters(model)
    predicted = sum(site.params_removed(COPIES) for site in sites_of(model))
    result = prune_quiet(copy.deepcopy(model), sparsity=COPIES / WIDTH)
    assert result.report["params_before"] == dense
    assert result.report["params_after"] == count_parameters(result.model) == dense - predicted
    assert predicted == 2 * (EXPERTS + (family == "qwen2_moe")) * COPIES * 3 * HIDDEN

    experts = prune_quiet(model, targets=("experts",), sparsity=0.25)  # one expert per layer
    per_expert = 3 * HIDDEN * WIDTH + HIDDEN  # gate and up rows, down columns, the router row
    assert experts.report["params_removed"] == dense - count_parameters(experts.model) == 2 * per_expert
    assert [layer["num_experts"] for layer in experts.report["layers"]] == [EXPERTS - 1] * 2


def test_vbp_on_experts_adds_no_bias_and_keeps_the_stock_layout():
    result = prune_quiet(tiny_moe("qwen2_moe"), method="vbp", sparsity=0.5)
    assert result.report["save_format"] == "stock"
    assert not any(layer.get("mlp_output_bias_added") for layer in result.report["layers"])
    assert result.model.model.layers[0].mlp.shared_expert.down_proj.bias is None
    assert torch.isfinite(logits(result.model)).all()


def test_qwen2_moe_dense_layers_are_pruned_as_plain_mlps():
    model = tiny_moe("qwen2_moe", layers=3, mlp_only_layers=[1])
    sites = sites_of(model)
    assert [type(s).__name__ for s in sites if s.index == 1] == ["MlpSite"]
    assert sum(isinstance(s, (ExpertSite, SharedExpertSite)) for s in sites) == 2 * (EXPERTS + 1)
    result = prune_quiet(model, sparsity=0.5)
    assert result.report["layers"][1]["mlp_width"] == 12 and "expert_width" not in result.report["layers"][1]
    assert result.report["save_format"] == "stock"
    config = result.model.config
    assert (config.intermediate_size, config.moe_intermediate_size, config.shared_expert_intermediate_size) == (
        12, 8, 8)


def test_statistics_cover_the_routed_unmasked_tokens_weighted_by_the_router():
    """The reference forward feeds expert e with w_t * h_t of its routed tokens, padding tokens left out, and
    returns what the stock experts module returns."""
    from hf_snp.units.expert_layer import ExpertEnergy, ExpertLayer
    from hf_snp.units.stats import SiteStatistics

    model = tiny_moe("mixtral")
    layer = model.model.layers[0]
    moe = ExpertLayer(layer, 0, get_adapter(model.config).experts_layout)
    x = torch.randn(10, HIDDEN, generator=torch.Generator().manual_seed(3))
    _, weights, index = layer.mlp.gate(x)
    with torch.no_grad():
        expected = layer.mlp.experts(x, index, weights)
    stats, energy = SiteStatistics("e2", WIDTH, torch.device("cpu")), ExpertEnergy("all", EXPERTS, torch.device("cpu"))
    handles = [moe.attach(2, stats), moe.attach(None, energy)]
    mask = torch.arange(10) % 3 != 0  # tokens 0, 3, 6, 9 are padding
    stats.token_mask = energy.token_mask = mask
    with torch.no_grad():
        got = layer.mlp.experts(x, index, weights)
    for handle in handles:
        handle.remove()
    assert "forward" not in layer.mlp.experts.__dict__  # the module's own forward is back
    assert torch.allclose(got, expected, atol=1e-5)
    tokens, slots = torch.where(index == 2)
    keep = mask[tokens]
    experts = layer.mlp.experts
    with torch.no_grad():
        gate, up = (x[tokens] @ experts.gate_up_proj[2].T).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up * weights[tokens, slots, None]
    assert stats.count == int(keep.sum()) and stats.count > 0
    second_moment, _ = stats.moments(centered=False)
    assert torch.allclose(second_moment, (h[keep].T @ h[keep]).double() / int(keep.sum()), atol=1e-5)
    assert int(energy.tokens.sum()) == int(mask[torch.where(index >= 0)[0]].sum())


def test_an_expert_no_token_reached_is_cut_by_weight_magnitude():
    from hf_snp.methods import SiteInputs, get_method

    model = tiny_moe("mixtral")
    site = next(s for s in sites_of(model) if isinstance(s, ExpertSite))
    stats = site.new_statistics(torch.device("cpu"))  # no token
    inputs = SiteInputs(stats, site.plan(COPIES), False, site.consumer_weight, 0)
    decision = site.decide(get_method("snp"), inputs, hf_snp.PruneConfig())
    assert len(decision.keep) == WIDTH - COPIES and decision.coef is None and decision.shift is None


def test_heads_alone_take_global_allocation_and_blocks_go_whole():
    heads = prune_quiet(tiny_moe("mixtral"), targets=("heads",), allocation="global", sparsity=0.3)
    assert heads.report["allocation"]["mode"] == "cumulative_variance" and torch.isfinite(logits(heads.model)).all()
    blocks = prune_quiet(tiny_moe("qwen3_moe", layers=3), targets=("blocks", "mlp", "experts"), sparsity=0.3)
    assert blocks.report["blocks"]["chosen"] in ("blocks", "units", "mixed")
    assert blocks.report["params_after"] == count_parameters(blocks.model)
    assert torch.isfinite(logits(blocks.model)).all()


# ---------------------------------------------------------------------------------------------- whole experts


@torch.no_grad()
def routed_energy(model, layer_index: int, ids: torch.Tensor) -> torch.Tensor:
    """sum_t ||w_t expert_e(x_t)||^2 of one layer's experts over ``ids``, computed from the router's choices and the
    experts' inputs by a separate loop."""
    block = model.model.layers[layer_index].mlp
    seen = {}
    handles = [block.gate.register_forward_hook(lambda m, a, out: seen.update(weights=out[1], index=out[2])),
               block.experts.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))]
    energies = torch.zeros(EXPERTS, dtype=torch.float64)
    try:
        for batch in ids.split(4):
            model(batch)
            experts = block.experts
            for token in range(seen["x"].shape[0]):
                for slot in range(TOP_K):
                    e = int(seen["index"][token, slot])
                    gate, up = (experts.gate_up_proj[e] @ seen["x"][token]).chunk(2)
                    y = experts.down_proj[e] @ (experts.act_fn(gate) * up)
                    energies[e] += float((seen["weights"][token, slot] * y).double().pow(2).sum())
    finally:
        for handle in handles:
            handle.remove()
    return energies


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_removal_drops_the_lowest_energy_experts(family):
    model = tiny_moe(family)
    with torch.no_grad():
        for experts in expert_modules(model):
            experts.down_proj[1] = 0  # expert 1 adds nothing: energy 0, removed first in every layer
    energies = routed_energy(model, 0, calibration_ids())
    assert energies[1] == 0 and (energies[[0, 2, 3]] > 0).all()
    expected = sorted(torch.argsort(energies, stable=True)[:2].tolist())
    routers = [layer.mlp.gate.weight.detach().clone() for layer in model.model.layers]
    stacked = [e.gate_up_proj.detach().clone() for e in expert_modules(model)]

    one = prune_quiet(copy.deepcopy(model), targets=("experts",), sparsity=0.25)
    for layer, router, gate_up in zip(one.model.model.layers, routers, stacked):
        assert torch.equal(layer.mlp.gate.weight, router[[0, 2, 3]])  # the planted expert's row went
        assert torch.equal(layer.mlp.experts.gate_up_proj, gate_up[[0, 2, 3]])
        assert layer.mlp.gate.num_experts == layer.mlp.experts.num_experts == 3
    assert getattr(one.model.config, COUNT_FIELD[family]) == 3 and one.report["save_format"] == "stock"

    two = prune_quiet(copy.deepcopy(model), targets=("experts",), sparsity=0.5)
    kept = [e for e in range(EXPERTS) if e not in expected]
    assert torch.equal(two.model.model.layers[0].mlp.gate.weight, routers[0][kept])  # brute-force ranking
    chosen = []
    handle = two.model.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, out: chosen.append(out[2]))
    out = logits(two.model)
    handle.remove()
    assert torch.isfinite(out).all()
    assert chosen[0].max() < 2 and len(chosen[0].unique()) == 2  # every token still routed to its top-2 of the 2 left
    tokens = two.model.generate(torch.tensor(PROMPT), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, len(PROMPT[0]) + 4)


def test_expert_sites_report_their_shapes():
    model = tiny_moe("qwen2_moe")
    sites = sites_of(model, ("mlp", "experts"))
    kinds = [(type(site).__name__, site.kind) for site in sites if site.index == 0]
    assert kinds == [("ExpertSite", "mlp")] * EXPERTS + [("SharedExpertSite", "mlp"), ("ExpertSetSite", "experts")]
    expert_set = next(site for site in sites if isinstance(site, ExpertSetSite))
    assert expert_set.max_steps() == EXPERTS - TOP_K and expert_set.params_per_step() == 3 * HIDDEN * WIDTH + HIDDEN


# ---------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize("options, message", [
    (dict(targets=("experts",), sparsity=0.75), "at most 2"),
    (dict(targets=("experts",), sparsity=0.25, layer_sparsity={1: 0.9}), "experts of layer 1"),
    (dict(targets=("mlp", "experts"), sparsity=0.2, sparsity_per_target={"mlp": 0.2, "experts": 0.8}), "at most 2"),
    (dict(targets=("mlp",), sparsity=0.25, allocation="global"), "global allocation cannot"),
    (dict(targets=("mlp",), sparsity=0.25, add_bias=True), "add_bias=True"),
])
def test_bad_budgets_are_refused_before_any_work(no_long_work, options, message):
    with pytest.raises(ValueError, match=message):
        prune_quiet(tiny_moe("mixtral"), **options)


def test_experts_of_a_dense_family_and_blocks_across_dense_layers_are_refused(no_long_work):
    from conftest import tiny_llama

    with pytest.raises(ValueError, match="cannot prune experts"):
        prune_quiet(tiny_llama(), targets=("experts",), sparsity=0.25)
    with pytest.raises(ValueError, match="renumber its dense layers"):
        prune_quiet(tiny_moe("qwen2_moe", layers=3, mlp_only_layers=[1]), targets=("blocks",), sparsity=0.3)


# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    from hf_snp.setup.checkpoint import Checkpoint

    model = tiny_moe("qwen2_moe")
    options = dict(targets=("mlp", "experts"), sparsity=0.5, layer_sparsity={1: 0.25})
    uninterrupted = prune_quiet(copy.deepcopy(model), **options)
    original = Checkpoint.save

    def save_then_crash(self, index, block, records):
        original(self, index, block, records)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prune_quiet(copy.deepcopy(model), checkpoint_dir=str(tmp_path / "ckpt"), **options)
    monkeypatch.setattr(Checkpoint, "save", original)
    resumed = prune_quiet(model, checkpoint_dir=str(tmp_path / "ckpt"), resume=True, **options)
    expected, got = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


# ---------------------------------------------------------------------------------------------- save / reload

RELOADER = """
import json, sys
{block}
import torch
import transformers

jobs, results = json.loads(sys.stdin.read()), []
for job in jobs:
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        del sys.modules[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(job["path"], **job["kwargs"]).eval()
    with torch.no_grad():
        torch.save(model(torch.load(job["ids"])).logits, job["out"])
        tokens = model.generate(torch.tensor(job["prompt"]), max_new_tokens=job["new"], min_new_tokens=job["new"],
                                do_sample=False)
    results.append({{"class": type(model).__name__, "tokens": tokens.tolist(),
                    "hf_snp_loaded": sys.modules.get("hf_snp") is not None}})
print("@@results@@" + json.dumps(results))
"""

# family -> (model, prune options); the per-layer cases set different widths and expert counts per layer
CASES = {
    "uniform": lambda family: (tiny_moe(family), dict(
        targets=("mlp", "heads", "experts"), sparsity_per_target={"mlp": 0.5, "heads": 0.5, "experts": 0.25})),
    # layer 0: 20% rounds to no expert neuron (one step is 8 of 16) and 1 expert; layer 1: 8 neurons, 2 experts
    "per_layer": lambda family: (tiny_moe(family), dict(targets=("mlp", "experts"), sparsity=0.5,
                                                        layer_sparsity={0: 0.2, 1: 0.5})),
}
RELOADS = {"uniform": [(BLOCK_HF_SNP, {})],
           "per_layer": [(BLOCK_HF_SNP, {"trust_remote_code": True}), ("import hf_snp", {})]}


def greedy(model) -> list:
    with torch.no_grad():
        return model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False).tolist()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family pruned both ways (and Qwen2-MoE with a dense layer) and saved, each reloaded in fresh
    processes, one per setup: hf_snp unimportable, or imported first."""
    root = tmp_path_factory.mktemp("moe")
    ids = str(root / "ids.pt")
    torch.save(eval_ids(), ids)
    cases, jobs = {}, {BLOCK_HF_SNP: [], "import hf_snp": []}
    # tiny models: one thread, as conftest gives the tests (two threads mostly wait on each other)
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "modules"), "OMP_NUM_THREADS": "1"}
    children = {block: subprocess.Popen([sys.executable, "-c", textwrap.dedent(RELOADER.format(block=block))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env) for block in jobs}  # importing while we prune
    try:
        runs = [(family, kind, *CASES[kind](family)) for family in FAMILIES for kind in CASES]
        runs.append(("qwen2_moe", "dense_layer", tiny_moe("qwen2_moe", layers=3, mlp_only_layers=[1]),
                     dict(targets=("mlp", "experts"), sparsity=0.5, method="vbp")))
        for family, kind, model, options in runs:
            out = str(root / f"{family}-{kind}")
            result = prune_quiet(model, output_dir=out, **options)
            with open(os.path.join(out, "config.json")) as handle:
                config = json.load(handle)
            case = cases[family, kind] = {"result": result, "logits": logits(result.model), "config": config,
                                          "tokens": greedy(result.model), "reloads": {}}
            for block, kwargs in RELOADS.get(kind, RELOADS["per_layer"]):
                job = {"path": out, "kwargs": kwargs, "ids": ids, "prompt": PROMPT, "new": NEW_TOKENS,
                       "out": str(root / f"{family}-{kind}-{len(jobs[block])}.pt")}
                jobs[block].append(job)
                case["reloads"][block] = job
    except BaseException:
        for child in children.values():
            child.kill()
        raise
    for block, child in children.items():
        out, err = child.communicate(json.dumps(jobs[block]))
        assert child.returncode == 0, f"reload in a fresh process ({block!r}) failed:\n{err[-4000:]}"
        for job, reply in zip(jobs[block], json.loads(out.split("@@results@@")[-1])):
            job["reply"], job["logits"] = reply, torch.load(job["out"])
    return cases


def check_reloads(case, expected_class: str) -> None:
    for block, reload in case["reloads"].items():
        assert reload["reply"]["hf_snp_loaded"] == (block == "import hf_snp"), block
        assert reload["reply"]["class"] == expected_class, block
        assert torch.allclose(reload["logits"], case["logits"], atol=1e-5), block
        assert reload["reply"]["tokens"] == case["tokens"], block


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_result_saves_as_the_stock_class_and_reloads_without_hf_snp(saved, family):
    case = saved[family, "uniform"]
    config, report = case["config"], case["result"].report
    assert report["save_format"] == "stock"
    assert config["model_type"] == family and "auto_map" not in config and "hf_snp_layers" not in config
    assert (config[WIDTH_FIELD[family]], config[COUNT_FIELD[family]]) == (8, 3)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 8)
    if family == "qwen2_moe":
        assert config["shared_expert_intermediate_size"] == 8
    model = case["result"].model
    assert report["params_after"] == count_parameters(model)
    for layer, module in zip(report["layers"], model.model.layers):
        assert (layer["expert_width"], layer["num_experts"], layer["num_heads"]) == (8, 3, 2)
        assert module.mlp.experts.down_proj.shape == (3, HIDDEN, 8) and module.mlp.gate.weight.shape == (3, HIDDEN)
        assert module.self_attn.q_proj.out_features == 2 * 8
    check_reloads(case, STOCK_CLASS[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_result_reloads_without_hf_snp_and_with_it(saved, family):
    case = saved[family, "per_layer"]
    config, report = case["config"], case["result"].report
    assert report["save_format"] == "hf_snp" and config["model_type"] == f"hf_snp_{family}"
    assert [(spec["expert_intermediate_size"], spec["num_experts"]) for spec in config["hf_snp_layers"]] == [
        (16, 3), (8, 2)] == [(layer["expert_width"], layer["num_experts"]) for layer in report["layers"]]
    assert config["hf_snp_layout"]["experts"]["router"] == "gate"
    model = case["result"].model
    assert [layer.mlp.experts.down_proj.shape[0] for layer in model.model.layers] == [3, 2]
    check_reloads(case, f"HfSnp{STOCK_CLASS[family]}")


def test_qwen2_moe_with_a_dense_layer_saves_and_reloads(saved):
    case = saved["qwen2_moe", "dense_layer"]
    report, config = case["result"].report, case["config"]
    # VBP adds a bias to the dense layer's down_proj only: the hf_snp type, per-layer kinds of MLP
    assert [layer.get("mlp_output_bias_added") for layer in report["layers"]] == [None, True, None]
    assert report["save_format"] == "hf_snp"
    assert config["hf_snp_layers"][1]["mlp_output_bias"] and "expert_intermediate_size" in config["hf_snp_layers"][0]
    check_reloads(case, "HfSnpQwen2MoeForCausalLM")


def test_old_layer_specs_and_layouts_still_load():
    from hf_snp.models.modeling_hf_snp import ExpertsLayout, LayerShape

    assert LayerShape.from_spec({"intermediate_size": 40}) == LayerShape(intermediate_size=40)
    assert LayerShape(num_experts=3, expert_intermediate_size=12).to_spec() == {"expert_intermediate_size": 12,
                                                                                "num_experts": 3}
    qwen2_moe, mixtral = tiny_moe("qwen2_moe").config, tiny_moe("mixtral").config
    layout = get_adapter(qwen2_moe).layout(qwen2_moe)
    assert ExpertsLayout.from_dict(json.loads(json.dumps(layout["experts"]))).shared.parent == "mlp.shared_expert"
    assert hf_snp.get_adapter(mixtral).layout(mixtral)["experts"]["shared"] is None
