"""Errors measured where the block uses them (docs/design.md §3.11): a consumer followed by a norm (Gemma 2/3,
OLMo 2) weighs each token by 1 / its output's mean square and each output dimension by the norm's gain.

Properties: the weighted statistics are the weighted moments of the tokens (folds and masks included); the metric
is the post-norm change at first order; on sites whose post-norm gain is strongly anisotropic and whose tokens' RMS
is heavy-tailed, the decisions made after the norm have a lower post-norm output error, computed by brute force
through the norm, than those made on the raw output error; families without a post-norm are unchanged."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import prune_quiet, tiny_gemma2, tiny_gemma3_text, tiny_llama, tiny_olmo2
from test_obs_ridge import batches_and_mask, fold_tokens

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from post_norm_metric import post_norm_error, rms_norm  # noqa: E402  (the benchmark's sites and brute force)
from post_norm_metric import site as anisotropic_site  # noqa: E402

from hf_snp.config import PruneConfig
from hf_snp.methods.snp import SNP
from hf_snp.units.removal import RemovalPlan
from hf_snp.units.site_inputs import SiteInputs
from hf_snp.units.stats import PostNormMetric, SiteStatistics

CPU = torch.device("cpu")


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 accumulation: 1e-6 of the largest entry."""
    torch.testing.assert_close(got, want.to(got), rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def token_weights(batches, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(h.shape[:-1], generator=g).add_(0.05) ** 3 for h, _ in batches]  # far from uniform


def weighted_moments(tokens: torch.Tensor, weights: torch.Tensor, centered: bool):
    p = weights / weights.sum()
    mu = p @ tokens
    x = tokens - mu if centered else tokens
    return (x * p[:, None]).T @ x, mu


@pytest.mark.parametrize("folds", [1, 2, 3])
def test_weighted_statistics_are_the_weighted_moments_of_each_fold(folds):
    n = 200  # two row panels: the mirrored lower triangle is checked as well
    batches = batches_and_mask(n, folds)
    weights = token_weights(batches, folds)
    stats = SiteStatistics("s", n, CPU, folds, weighted=True)
    for (h, mask), w in zip(batches, weights):
        stats.token_mask = mask
        stats.update(h, w)
    weighted = [(h, mask, w.reshape(-1) if mask is None else w.reshape(-1)[mask]) for (h, mask), w in
                zip(batches, weights)]
    fold_w = [torch.cat(parts) for parts in zip(*[torch.tensor_split(w.double(), folds) for _, _, w in weighted])]
    fold_x = fold_tokens(batches, folds)
    for centered in (False, True):
        for fold in range(folds):
            got_m, got_mu = stats.moments(centered, [fold])
            want_m, want_mu = weighted_moments(fold_x[fold], fold_w[fold], centered)
            close(got_m, want_m)
            close(got_mu, want_mu)
        got_m, got_mu = stats.moments(centered)
        want_m, want_mu = weighted_moments(torch.cat(fold_x), torch.cat(fold_w), centered)
        close(got_m, want_m)
        close(stats.mean(range(folds)), want_mu)
    assert stats.mean_weight == pytest.approx(float(torch.cat(fold_w).mean()), rel=1e-9)


def test_weights_are_refused_by_unweighted_statistics_and_required_by_weighted_ones():
    h = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="weighted"):
        SiteStatistics("s", 4, CPU).update(h, torch.ones(5))
    with pytest.raises(RuntimeError, match="weighted"):
        SiteStatistics("s", 4, CPU, weighted=True).update(h)


def decide(x, weight, gain, after_norm: bool, removed: int):
    metric = PostNormMetric(gain, 1e-6, CPU) if after_norm else None
    stats = SiteStatistics("s", x.shape[1], CPU, 2, post_norm=metric)
    if after_norm:
        stats.update_after_norm(x, x @ weight.T)
    else:
        stats.update(x)
    plan = RemovalPlan(x.shape[1], 1, [list(range(x.shape[1]))], removed)
    return SNP().decide(SiteInputs(stats, plan, False, weight, 0), PruneConfig(ordering="obs"))


def test_the_objective_after_the_norm_beats_the_raw_one_by_brute_force():
    """8 sites (4 seeds, 4 and 6 of 16 units removed): the decisions made after the norm have a lower post-norm
    error, through the norm itself, on most sites and less than half of the raw decisions' in total."""
    ours, raw = [], []
    for seed in range(4):
        x, weight, gain = anisotropic_site(seed, 0.3)
        for removed in (4, 6):
            ours.append(post_norm_error(x, weight, gain, decide(x, weight, gain, True, removed)))
            raw.append(post_norm_error(x, weight, gain, decide(x, weight, gain, False, removed)))
    assert sum(a < b for a, b in zip(ours, raw)) >= 6
    assert sum(ours) < 0.5 * sum(raw)


@pytest.mark.parametrize("seed", range(3))
def test_the_metric_is_the_post_norm_change_at_first_order(seed):
    """One token: w |S^½ δy|² (the metric's error) equals |z(y + δy) − z(y)|² for a small δy."""
    g = torch.Generator().manual_seed(seed)
    y = 3.0 * torch.randn(1, 8, generator=g, dtype=torch.float64)
    gain = torch.rand(8, generator=g, dtype=torch.float64) * 4
    delta = 1e-5 * torch.randn(1, 8, generator=g, dtype=torch.float64)
    metric = PostNormMetric(gain, 1e-6, CPU)
    weights = metric.token_weights(y).double()
    metric.update(y, weights)
    predicted = float(weights[0] * (metric.root(weights.sum()) @ delta[0]).pow(2).sum())
    exact = float((rms_norm(y + delta, gain) - rms_norm(y, gain)).pow(2).sum())
    assert predicted == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize("build, has_post_norm", [(tiny_llama, False), (tiny_gemma2, True),
                                                   (tiny_gemma3_text, True), (tiny_olmo2, True)])
def test_sites_know_the_norm_after_their_consumer(build, has_post_norm):
    from hf_snp.adapters import get_adapter

    model = build(0)
    layer = model.model.layers[0]
    adapter = get_adapter(model.config)
    sites = adapter.sites(layer, 0, ("heads", "mlp"), model.config, "per_group")
    assert [site.kind for site in sites] == ["heads", "mlp"]
    for site in sites:
        assert (site.post_norm is not None) == has_post_norm
        if has_post_norm:  # the gain read off the norm: Gemma's 1 + w, OLMo 2's w
            assert site.stop_module is site.post_norm
            metric = PostNormMetric.of(site.post_norm, site.consumer_outputs, CPU)
            weight = site.post_norm.weight.detach().double()
            gain = weight if "olmo2" in model.config.model_type else 1 + weight
            torch.testing.assert_close(metric.gain_sq.double(), gain.pow(2), rtol=1e-5, atol=1e-6)


def test_post_norm_weights_change_gemma2_decisions_and_can_be_turned_off():
    options = dict(sparsity=0.25, targets=("mlp",), num_samples=4, seq_len=16, ordering="obs")
    weighted = prune_quiet(tiny_gemma2(0), **options)
    again = prune_quiet(tiny_gemma2(0), **options)
    raw = prune_quiet(tiny_gemma2(0), post_norm_weights=False, **options)
    state = weighted.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.model.state_dict().items())
    assert any(not torch.equal(state[k], v) for k, v in raw.model.state_dict().items() if "down_proj" in k)


def test_families_without_a_post_norm_ignore_the_option():
    options = dict(sparsity=0.25, targets=("mlp", "heads"), num_samples=4, seq_len=16)
    on = prune_quiet(tiny_llama(0), **options).model.state_dict()
    off = prune_quiet(tiny_llama(0), post_norm_weights=False, **options).model.state_dict()
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
