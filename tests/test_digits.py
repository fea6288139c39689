"""Real data for the vision path: a DeiT trained on scikit-learn's digits keeps its held-out accuracy
when SNP removes half of its MLP neurons (benchmarks/digits_deit.py trains it from scratch)."""

from __future__ import annotations

import copy
import os
import sys

import pytest

import hf_snp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from digits_deit import CALIBRATION, train_digits_deit  # noqa: E402

pytestmark = pytest.mark.slow
MARGIN = 0.02  # SNP at 50% of MLP stays within 2 points of the dense model's top-1


def test_snp_keeps_digits_accuracy_within_the_margin_and_at_least_vbp():
    dense, processor, split, _, test_x = train_digits_deit(epochs=12)
    test = (test_x, split["test"][1])
    base = hf_snp.evaluate_accuracy(dense, test, progress=False)["top1"]
    assert base > 0.6  # the model learned the task (chance is 0.1)
    accuracy = {}
    for method in ("snp", "vbp"):
        # half of each MLP: at 30% both methods stay at the dense accuracy and their order comes down to one test
        # image (SNP's default and VBP, 12-epoch model); at 50% SNP stays at dense and VBP loses 2 points
        result = hf_snp.prune(copy.deepcopy(dense), method=method, sparsity=0.5, round_to=1,
                              calibration=split["train"][0][:CALIBRATION], image_processor=processor,
                              num_samples=CALIBRATION, progress=False)
        assert result.report["params_after"] < result.report["params_before"]
        accuracy[method] = hf_snp.evaluate_accuracy(result.model, test, progress=False)["top1"]
    print(f"dense {base:.4f}, snp {accuracy['snp']:.4f}, vbp {accuracy['vbp']:.4f}")
    assert accuracy["snp"] >= base - MARGIN
    assert accuracy["snp"] >= accuracy["vbp"]
