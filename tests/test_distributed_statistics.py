"""Statistics summed over gloo ranks equal the statistics of all batches in one process."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import run_ranks

from hf_snp import parallel
from hf_snp.units.reduction import all_reduce_cross, all_reduce_statistics
from hf_snp.units.stats import CrossMoments, SiteStatistics

UNITS = 40


def batches(count: int = 6, tokens: int = 50, seed: int = 0) -> list[torch.Tensor]:
    """Batches with a large common offset and different means, so that the shifts of the ranks differ."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(UNITS, UNITS, generator=generator)
    return [(torch.randn(tokens, UNITS, generator=generator) @ mix + 30.0 + i) for i in range(count)]


def statistics(parts: list[torch.Tensor], folds: int) -> SiteStatistics:
    stats = SiteStatistics("site", UNITS, torch.device("cpu"), folds)
    for part in parts:
        stats.update(part)
    return stats


def on_each_rank() -> dict:
    """Everything the tests compare, computed once per rank (starting processes is the slow part)."""
    results = {}
    for folds in (1, 2):
        stats = all_reduce_statistics(statistics(parallel.shard(batches()), folds))
        results[folds] = {"all": stats.moments(True), "raw": stats.moments(False), "counts": stats.fold_counts,
                          "folds": [stats.moments(True, [f]) for f in range(folds)]}
    cross = CrossMoments("site", UNITS, torch.device("cpu"))
    for dense in parallel.shard(batches()):
        cross.update(dense, dense * 0.5 - 3.0)
    results["cross"] = all_reduce_cross(cross).moments(True)
    results["shards"] = {count: parallel.shard(list(range(count))) for count in (0, 1, 5, 6)}
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request) -> list[dict]:
    return run_ranks(request.param, on_each_rank)


def close(got: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(got[0], reference[0], rtol=1e-5, atol=1e-6 * float(reference[0].abs().max()))
    torch.testing.assert_close(got[1], reference[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("folds", [1, 2])
def test_reduced_statistics_equal_one_process(ranks, folds):
    single = statistics(batches(), folds)
    for got in ranks:
        got = got[folds]
        assert got["counts"] == single.fold_counts
        close(got["all"], single.moments(True))
        close(got["raw"], single.moments(False))
        for fold in range(folds):
            close(got["folds"][fold], single.moments(True, [fold]))


def test_reduced_cross_moments_equal_one_process(ranks):
    single = CrossMoments("site", UNITS, torch.device("cpu"))
    for dense in batches():
        single.update(dense, dense * 0.5 - 3.0)
    for got in ranks:
        close(got["cross"], single.moments(True))


@pytest.mark.parametrize("count", [0, 1, 5, 6])
def test_shards_cover_every_item_once_in_order(ranks, count):
    shares = [got["shards"][count] for got in ranks]
    assert [i for share in shares for i in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_without_a_process_group_everything_is_the_identity():
    stats = statistics(batches(), 2)
    before = [g.clone() for g in stats.fold_grams]
    assert all_reduce_statistics(stats) is stats
    assert all(torch.equal(a, b) for a, b in zip(before, stats.fold_grams))
    assert parallel.world_size() == 1 and parallel.rank() == 0 and parallel.shard([1, 2, 3]) == [1, 2, 3]
