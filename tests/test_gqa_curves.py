"""Global allocation's curves on GQA ``per_group`` heads: one step removes one query head from every KV group,
so a step's cost and score cover all of those heads (not one head per step)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_snp.adapters import adapter_for_type
from hf_snp.config import PruneConfig
from hf_snp.methods import SiteInputs, get_method
from hf_snp.units.allocation import SiteCurve
from hf_snp.units.sites import HeadSite
from hf_snp.units.stats import SiteStatistics


def head_site_with_statistics(num_heads: int, num_kv_heads: int, seed: int = 0):
    config = LlamaConfig(vocab_size=32, hidden_size=8 * num_heads, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=8)
    model = LlamaForCausalLM(config)
    site = HeadSite(model.model.layers[0], 0, adapter_for_type("llama").attention_layout, 8, "per_group")
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(site.num_units, site.num_units, generator=generator, dtype=torch.float64)
    stats = SiteStatistics(site.name, site.num_units, torch.device("cpu"))
    stats.update(torch.randn(4 * site.num_units, site.num_units, generator=generator, dtype=torch.float64) @ mixing)
    return site, stats


@pytest.mark.parametrize("method", ["snp", "vbp", "flap"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 2), (6, 3)])
def test_per_group_curve_has_one_entry_per_step_covering_every_kv_group(method, heads, kv_heads):
    site, stats = head_site_with_statistics(heads, kv_heads)
    assert site.mode == "per_group" and site.max_steps() == heads // kv_heads
    chosen = get_method(method)
    inputs = SiteInputs(stats, site.plan(site.curve_steps()), True, site.consumer_linear.weight.detach(), 1)
    _, costs = chosen.order(inputs, PruneConfig(method=method))
    assert len(costs) == heads  # the full order removes every head, one KV group's head at a time
    curve = SiteCurve.from_site(site, chosen.global_scores(costs), costs)
    entry_scores = chosen.global_scores(costs)
    assert len(curve.scores) == site.max_steps() and len(curve.costs) == site.max_steps()
    for step in range(1, site.max_steps() + 1):
        # step s removes the heads of round s: kv_heads entries of the full order
        assert curve.costs[step - 1] == pytest.approx(sum(costs[(step - 1) * kv_heads: step * kv_heads]))
        assert curve.scores[step - 1] == entry_scores[step * kv_heads - 1]
        assert curve.params_removed[step] == site.params_removed(step)
    # exhaustively over every threshold: the steps taken are the full rounds whose every head scores below it
    for threshold in sorted(set(entry_scores)) + [float("-inf"), float("inf")]:
        rounds = 0
        while rounds < site.max_steps() and all(s <= threshold for s in entry_scores[: (rounds + 1) * kv_heads]):
            rounds += 1
        assert curve.steps_at(threshold) == rounds, threshold
