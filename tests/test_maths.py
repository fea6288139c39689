"""Property tests of the maths on random matrices (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_snp.methods import get_method
from hf_snp.units.linalg import damped, greedy_zca_elimination, least_squares_map
from hf_snp.units.removal import Decision, split
from hf_snp.units.stats import NonFiniteActivationError, SiteStatistics
from hf_snp.units.surgery import fold_into_consumer

F64 = dict(dtype=torch.float64)


@st.composite
def problems(draw):
    """Random activations h (T x n, correlated, some units near-dependent), a consumer W, a cut."""
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(3, 24))
    rank = draw(st.integers(1, n))
    tokens = draw(st.integers(n + 2, 4 * n + 40))
    num_drop = draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, n, generator=g, **F64)
    h = torch.randn(tokens, rank, generator=g, **F64) @ basis + 0.3 * torch.randn(tokens, n, generator=g, **F64) \
        + torch.randn(n, generator=g, **F64)
    w, b = torch.randn(5, n, generator=g, **F64), torch.randn(5, generator=g, **F64)
    drop = torch.randperm(n, generator=g)[:num_drop]
    return h, w, b, drop


def empirical_moments(h):
    mu = h.mean(0)
    return (h - mu).T @ (h - mu) / len(h), mu


def output_error(h, w, b, linear):
    """Mean squared output error of the cut consumer against the dense one, over the same tokens."""
    keep = torch.arange(h.shape[1])[torch.isin(torch.arange(h.shape[1]), linear.kept)]
    dense = h @ w.T + b
    pruned = linear(h[:, keep])
    return ((dense - pruned) ** 2).sum(1).mean()


def cut(w, b, decision):
    linear = nn.Linear(w.shape[1], w.shape[0], **F64)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    fold_into_consumer(linear, decision)
    linear.kept = decision.keep
    return linear


@settings(max_examples=60, deadline=None)
@given(problems())
def test_reconstruction_error_equals_the_schur_complement_trace(problem):
    h, w, b, drop = problem
    sigma, mu = empirical_moments(h)
    keep, drop = split(h.shape[1], drop, torch.device("cpu"))
    coef = least_squares_map(sigma, keep, drop, damping=0.0)
    decision = Decision(keep, drop, coef, mu[drop] - coef @ mu[keep])
    s = sigma[drop][:, drop] - sigma[drop][:, keep] @ torch.linalg.solve(sigma[keep][:, keep], sigma[keep][:, drop])
    predicted = torch.trace(w[:, drop] @ s @ w[:, drop].T)
    assert torch.allclose(output_error(h, w, b, cut(w, b, decision)), predicted, rtol=1e-6, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(0.0, 0.1))
def test_least_squares_is_never_worse_than_no_reconstruction(problem, damping):
    h, w, b, drop = problem
    sigma, mu = empirical_moments(h)
    keep, drop = split(h.shape[1], drop, torch.device("cpu"))
    coef = least_squares_map(sigma, keep, drop, damping=damping)
    with_ls = output_error(h, w, b, cut(w, b, Decision(keep, drop, coef, mu[drop] - coef @ mu[keep])))
    mean_only = output_error(h, w, b, cut(w, b, Decision(keep, drop, None, mu[drop])))  # VBP: B = 0
    nothing = output_error(h, w, b, cut(w, b, Decision(keep, drop)))
    if damping == 0.0:
        assert with_ls <= mean_only * (1 + 1e-9) + 1e-12
    assert mean_only <= nothing * (1 + 1e-9) + 1e-12


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([0.0, 1e-6, 1e-2]))
def test_cumulative_variance_curve_ends_at_one_and_never_decreases(problem, damping):
    """SNP's global scores over a full elimination: the fraction of variance removed, 0..1, non-decreasing."""
    h = problem[0]
    sigma, _ = empirical_moments(h)
    removed, pivots = greedy_zca_elimination(sigma, h.shape[1], max(damping, 1e-9))
    curve = torch.tensor(get_method("snp").global_scores(pivots), dtype=torch.float64)
    assert sorted(removed) == list(range(h.shape[1]))
    assert all(p >= 0 for p in pivots)
    assert torch.all(curve[1:] >= curve[:-1] - 1e-12)
    assert abs(float(curve[-1]) - 1.0) < 1e-12


@settings(max_examples=60, deadline=None)
@given(problems())
def test_greedy_pivots_are_the_ldl_diagonal_in_that_order(problem):
    """The left-looking elimination is a pivoted factorisation: its pivots match a Cholesky of the permuted matrix."""
    sigma, _ = empirical_moments(problem[0])
    removed, unique = greedy_zca_elimination(sigma, sigma.shape[0], 1e-9)
    order, pivots = removed[::-1], torch.tensor(unique[::-1], dtype=sigma.dtype)  # most important unit first
    permuted = damped(sigma, 1e-9)[order][:, order]
    ldl_diagonal = torch.linalg.cholesky(permuted).diagonal() ** 2
    assert torch.allclose(pivots, ldl_diagonal, rtol=1e-6, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_each_greedy_step_removes_the_unit_with_least_unique_variance(problem):
    """r_i = 1 / [M_SS^-1]_ii recomputed from scratch agrees with the downdated choice."""
    sigma, _ = empirical_moments(problem[0])
    m = damped(sigma, 1e-9)
    removed, unique = greedy_zca_elimination(sigma, sigma.shape[0] - 1, 1e-9)
    alive = list(range(sigma.shape[0]))
    for unit, r in zip(removed, unique):
        scores = 1 / torch.linalg.inv(m[alive][:, alive]).diagonal()
        assert abs(float(scores.min()) - r) <= 1e-6 * float(scores.max())
        assert float(scores[alive.index(unit)]) <= float(scores.min()) * (1 + 1e-6) + 1e-12
        alive.remove(unit)


def test_statistics_match_a_direct_computation_and_exclude_masked_tokens():
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(3, 7, 5, generator=g) * 4 + 100).float()  # a large mean: the shift keeps the small variance
    mask = torch.rand(3 * 7, generator=g) > 0.3
    stats = SiteStatistics("t", 5, torch.device("cpu"))
    stats.token_mask = mask
    stats.update(h)
    sigma, mu = stats.moments(centered=True)
    kept = h.reshape(-1, 5)[mask].double()
    assert stats.count == int(mask.sum())
    assert torch.allclose(mu, kept.mean(0), atol=1e-4)
    assert torch.allclose(sigma, torch.cov(kept.T, correction=0), rtol=1e-4, atol=1e-4)
    raw, _ = stats.moments(centered=False)
    assert torch.allclose(raw, kept.T @ kept / len(kept), rtol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("batch", [0, 2])
def test_a_non_finite_activation_in_any_batch_is_refused(bad, batch):
    """One NaN or inf in one token of one batch, the first (it also spoils the shift) or a later one."""
    stats = SiteStatistics("layer 3 mlp", 6, torch.device("cpu"))
    for index in range(3):
        h = torch.randn(2, 5, 6)
        if index == batch:
            h[1, 3, 4] = bad
            with pytest.raises(NonFiniteActivationError, match="layer 3 mlp"):
                stats.update(h)
            return
        stats.update(h)


@pytest.mark.parametrize("n, remove", [(40, 40), (64, 20), (7, 3)])
def test_lapack_elimination_matches_the_column_loop(n, remove):
    """LAPACK's pivoted Cholesky of the precision is the greedy ZCA elimination (unit weights force the loop)."""
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(3 * n, n, generator=generator, dtype=torch.float64) \
        @ torch.randn(n, n, generator=generator, dtype=torch.float64)
    moment = x.T @ x / len(x)
    fast = greedy_zca_elimination(moment, remove, 1e-6)
    loop = greedy_zca_elimination(moment, remove, 1e-6, weights=torch.ones(n, dtype=torch.float64))
    assert fast[0] == loop[0]
    assert torch.allclose(torch.tensor(fast[1]), torch.tensor(loop[1]), rtol=1e-8)


@pytest.mark.parametrize("n", [7, 600, 1000, 1600])
def test_statistics_accumulated_by_blocks_equal_the_covariance(n):
    """The Gram is summed over its upper block triangle only: the moments must still be the full ones."""
    generator = torch.Generator().manual_seed(n)
    batches = [torch.randn(2, 40, n, generator=generator) * 3 + 1 for _ in range(3)]
    stats = SiteStatistics("site", n, torch.device("cpu"))
    for batch in batches:
        stats.update(batch)
    x = torch.cat([b.reshape(-1, n) for b in batches]).double()
    sigma, mu = stats.moments(centered=True)
    assert len(stats.panels) == max(1, min(8, n // 192))
    assert torch.allclose(sigma, torch.cov(x.T, correction=0), atol=1e-4) and torch.allclose(mu, x.mean(0), atol=1e-5)
    second, _ = stats.moments(centered=False)
    assert torch.allclose(second, x.T @ x / len(x), atol=1e-3)


@given(st.integers(1, 4), st.integers(1, 8), st.booleans(), st.data())
@settings(max_examples=60, deadline=None)
def test_select_by_score_removes_the_lowest_alive_group_of_each_pool_at_each_step(num_pools, per_pool, one_pool, data):
    """The ranked-cursor selection equals the definition: per scheduled step, min over the pool's alive groups."""
    from hf_snp.units.removal import RemovalPlan, select_by_score

    n = num_pools * per_pool
    pools = [list(range(n))] if one_pool else [list(range(i * per_pool, (i + 1) * per_pool)) for i in range(num_pools)]
    rounds = data.draw(st.integers(0, min(len(pool) for pool in pools)))
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=torch.float64)  # ties
    plan = RemovalPlan(n, 1, pools, rounds)
    alive, expected = [True] * n, []
    for pool in plan.schedule:
        best = min((g for g in pool if alive[g]), key=lambda g: (float(scores[g]), g))
        alive[best] = False
        expected.append(best)
    assert select_by_score(scores, plan) == expected
