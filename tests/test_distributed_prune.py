"""N gloo ranks give the pruned weights of one process (docs/design.md §8.6): every regression case (SNP default and
as in the paper, VBP, the baselines, heads in both GQA modes, global allocation, blocks alone and with units, round_to
/ min_width, per-layer budgets, a DeiT), and experts, output_error allocation, dense-target reconstruction and the
iterative block search."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from distributed_helpers import run_ranks
from regression_cases import CASES, ZCA, Case, report_subset, state_dict_of
from test_moe import tiny_moe

import hf_snp

EXTRA = [
    Case("snp_mlp_experts_mixtral", lambda: tiny_moe("mixtral", 3), dict(sparsity=0.3, targets=("mlp", "experts"))),
    Case("snp_mlp_heads_qwen2_moe", lambda: tiny_moe("qwen2_moe", 4), dict(sparsity=0.3, targets=("mlp", "heads"))),
    Case("snp_output_error_llama", lambda: tiny_llama(14), dict(sparsity=0.4, targets=("mlp", "heads"),
                                                                allocation="output_error")),
    Case("snp_dense_target_llama", lambda: tiny_llama(15), dict(sparsity=0.4, targets=("mlp", "heads"),
                                                                reconstruction_target="dense", ridge="fixed")),
    Case("snp_iterative_blocks_llama", lambda: tiny_llama(16), dict(sparsity=0.3, targets=("blocks", "mlp"),
                                                                    block_search="iterative", **ZCA)),
]
ALL = CASES + EXTRA


def outcome(case: Case) -> dict:
    result = case.prune(hf_snp)
    return {"weights": state_dict_of(result.model), "report": report_subset(result.report)}


def on_each_rank() -> dict:
    return {case.name: outcome(case) for case in ALL}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(2, on_each_rank)


@pytest.mark.parametrize("case", ALL, ids=[case.name for case in ALL])
def test_two_ranks_prune_to_the_single_process_weights(two_ranks, case):
    single = outcome(case)
    for got in two_ranks:
        got = got[case.name]
        assert got["report"]["layers"] == single["report"]["layers"]  # the same kept widths in every layer
        assert got["report"]["params_after"] == single["report"]["params_after"]
        assert sorted(got["weights"]) == sorted(single["weights"])
        for name, reference in single["weights"].items():
            assert got["weights"][name].shape == reference.shape, name
            # each rank sums its float32 statistics around its own first batch's mean before the exact float64
            # rebase, so the moments differ from one process's in float32 rounding; measured: at most 1.9e-5 of a
            # tensor's largest entry over these cases (in folded biases, where the least-squares map cancels)
            difference = float((got["weights"][name] - reference).abs().max())
            assert difference <= 1e-4 * float(reference.abs().max()), f"{name}: {difference:.3g}"
    first, second = (ranks[case.name]["weights"] for ranks in two_ranks)
    assert all(torch.equal(first[name], second[name]) for name in first)  # every rank holds the same model
