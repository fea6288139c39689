"""Write the reference pruned weights and reports of tests/regression_cases.py.

How the stored files were made: from the pre-refactor commit ffcfff7, checked out as a
worktree, with the case definitions of the current tests:

    git -C /work/main worktree add /tmp/base ffcfff7
    PYTHONPATH=/tmp/base:/work/main/tests python tests/data/regression/generate.py
    git -C /work/main worktree remove /tmp/base --force

(`import hf_snp` then resolves to /tmp/base/hf_snp; the script prints the path it used.)
Run it again only to add a case, or on purpose when a change of results is intended.

Regenerated on purpose, with the code of the commit that changed them:
* snp_global_mlp_heads_llama, snp_global_per_target_llama: global allocation's per_group head
  curves priced step s as s heads instead of s x (KV groups) heads (fixed in SiteCurve.from_site).
* flap_mlp_heads_llama, flap_mlp_heads_opt: FLAP's head score became the reference code's (CASIA-IVA-Lab/FLAP
  prune_flap: the o_proj metric squared, standardised within the layer, averaged per head; issue 15 item 7).
Added with the code that made them the defaults (issue 15: ordering='obs', ridge='heldout'):
* snp_default_mlp_heads_llama, snp_default_mlp_opt (the older SNP cases pin ordering='zca', ridge='fixed').
  Regenerated when the held-out ridge took one held-out fold instead of every fold in turn (the decide-cost issue:
  one eigendecomposition a site; on SmolLM2 the same perplexity on WikiText at 10/30/50%, Python-source
  calibration 89.89 / 213.12 against 89.78 / 225.43 at 30/50%, benchmarks/results/ridge_one_split*.md).
Usage: generate.py [CASE ...]  (default: every case).
"""

from __future__ import annotations

import json
import os
import sys

from regression_cases import BY_NAME, CASES, DATA_DIR, report_subset, state_dict_of
from safetensors.torch import save_file

import hf_snp


def main(names: list[str]) -> None:
    print(f"hf_snp from {hf_snp.__file__}")
    os.makedirs(DATA_DIR, exist_ok=True)
    for case in [BY_NAME[n] for n in names] if names else CASES:
        result = case.prune(hf_snp)
        save_file(state_dict_of(result.model), os.path.join(DATA_DIR, f"{case.name}.safetensors"))
        with open(os.path.join(DATA_DIR, f"{case.name}.json"), "w", encoding="utf-8") as handle:
            json.dump(report_subset(result.report), handle, indent=1, sort_keys=True)
        print(case.name, result.report["params_before"], "->", result.report["params_after"])


if __name__ == "__main__":
    main(sys.argv[1:])
