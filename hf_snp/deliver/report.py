"""The pruning report: a JSON-serialisable dict with a stable schema, a table view and plots.

Schema (``schema_version`` 1): hf_snp_version, base_model, model_type, save_format, the
PruneConfig fields (method, sparsity, targets, ...), calibration, calibration_tokens, device,
output_dir,
params_before, params_after, params_removed, layers (one dict per layer, ``LayerRecord.to_dict``: layer,
source_layer when blocks were removed, mlp_width_before, mlp_width, mlp_output_bias_added, num_heads_before,
num_heads, num_kv_heads_before, num_kv_heads, attention_output_bias_added, and in mixtures of experts
expert_width(_before), shared_expert_width(_before), num_experts(_before), for the pruned targets; held-out ridges
``<site>_ridge``), timings_s, metrics (e.g. perplexity_before / perplexity_after, filled by evaluation when asked).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from ..models.modeling_hf_snp import LayerShape
from ..units.records import RECORD_KEYS, LayerRecord
from ..version import __version__

SCHEMA_VERSION = 1
REPORT_NAME = "hf_snp_report.json"
# the LayerShape widths a report shows, with their labels
WIDTH_LABELS = {"intermediate_size": "MLP neurons", "num_attention_heads": "query heads",
                "num_key_value_heads": "KV heads", "expert_intermediate_size": "expert neurons",
                "num_experts": "experts", "shared_expert_intermediate_size": "shared expert neurons"}


class PruneReport(dict):
    """A dict (saved as JSON as is) with helpers to print and plot it."""

    @classmethod
    def build(cls, *, base_model: str | None, model_name: str, model_type: str, save_format: str,
              settings: dict[str, Any], options: dict[str, Any], calibration: Any, calibration_tokens: int,
              device: str, output_dir: str | None, params_before: int, params_after: int,
              layers: Sequence[LayerRecord | Mapping],
              allocation: dict[str, Any], blocks: dict | None, timings: dict[str, float]) -> "PruneReport":
        """The report of a finished run, from plain values: its settings (the fields that decide the result, at the
        top level), the parameter counts, per-layer shapes, allocation, blocks and timings; the other options
        under ``options``. ``layers``: one record per layer (or its JSON form)."""
        return cls({
            "schema_version": SCHEMA_VERSION,
            "hf_snp_version": __version__,
            "base_model": base_model,
            "model_name": model_name,
            "model_type": model_type,
            "save_format": save_format,
            **settings,
            "options": options,
            "calibration": calibration,
            "calibration_tokens": calibration_tokens,
            "device": device,
            "output_dir": output_dir,
            "params_before": params_before,
            "params_after": params_after,
            "params_removed": params_before - params_after,
            "layers": [dict(layer) if isinstance(layer, Mapping) else layer.to_dict() for layer in layers],
            "allocation": allocation,
            **({"blocks": blocks} if blocks else {}),
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "metrics": {},
        })

    @classmethod
    def load(cls, path: str) -> "PruneReport":
        """Read a report from a JSON file or from a saved model directory."""
        if os.path.isdir(path):
            path = os.path.join(path, REPORT_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no hf_snp report at {path}: was this directory written by hf_snp?")
        with open(path, encoding="utf-8") as handle:
            return cls(json.load(handle))

    def layer_shapes(self) -> list[tuple[int, LayerShape, LayerShape]]:
        """(layer, widths before, shape after) for every per-layer record."""
        records = [LayerRecord.from_dict(layer) for layer in self.get("layers", [])]
        return [(record.layer, record.before, record.after) for record in records]

    def _width_fields(self, candidates=tuple(WIDTH_LABELS)) -> list[str]:
        """The width fields that some layer record holds (its pruned targets)."""
        return [f for f in candidates if any(getattr(after, f) is not None for _, _, after in self.layer_shapes())]

    def table(self) -> str:
        """A plain-text summary and a per-layer table."""
        lines = [
            f"model        {self.get('base_model') or self.get('model_name')} ({self.get('model_type')}, "
            f"saved as {self.get('save_format')})",
            f"method       {self.get('method')}, sparsity {self.get('sparsity', 0):.0%} "
            f"of {', '.join(self.get('targets', []))}",
            f"parameters   {self.get('params_before', 0):,} -> {self.get('params_after', 0):,} "
            f"(-{self.get('params_removed', 0) / max(self.get('params_before', 1), 1):.1%})",
            f"calibration  {self.get('calibration')} ({self.get('calibration_tokens')} tokens)",
            f"time         {self.get('timings_s', {}).get('total', 0):.1f} s",
        ]
        for name, value in self.get("metrics", {}).items():
            if isinstance(value, (list, dict)) or value is None:  # the replies side by side: in the JSON and card
                continue
            lines.append(f"{name:<12} {value:.4g}" if isinstance(value, float) else f"{name:<12} {value}")
        columns = self._width_fields()
        if columns:
            lines += ["", "layer  " + "  ".join(f"{RECORD_KEYS[c]:>16}" for c in columns)]
            for index, before, after in self.layer_shapes():
                cells = [f"{getattr(before, c) if getattr(before, c) is not None else getattr(after, c)} -> "
                         f"{getattr(after, c)}" for c in columns]
                lines.append(f"{index:>5}  " + "  ".join(f"{cell:>16}" for cell in cells))
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Per-layer widths (MLP and heads) and, when measured, perplexity before/after, as one PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = self._width_fields(("intermediate_size", "num_attention_heads"))
        ppl = {k: v for k, v in self.get("metrics", {}).items()
               if k.startswith("perplexity") and isinstance(v, (int, float))}
        curves = self.get("allocation", {}).get("curves") or {}
        rounds = self.get("blocks", {}).get("rounds") or []
        count = len(panels) + bool(ppl) + bool(curves) + bool(rounds)
        fig, axes = plt.subplots(1, max(count, 1), figsize=(4.5 * max(count, 1), 3.4), squeeze=False)
        shapes = self.layer_shapes()
        layers = [index for index, _, _ in shapes]
        for ax, column in zip(axes[0], panels):
            before = [getattr(b, column) or 0 for _, b, _ in shapes]
            after = [getattr(a, column) or 0 for _, _, a in shapes]
            ax.bar(layers, before, color="lightgrey", label="before")
            ax.bar(layers, after, color="tab:blue", label="after")
            ax.set_xlabel("layer")
            ax.set_ylabel(WIDTH_LABELS[column])
            ax.legend(fontsize=8)
        if curves:
            ax = axes[0][len(panels)]
            colors = plt.cm.viridis
            layer_count = max(int(key.split(".")[0]) for key in curves) + 1
            for key, retained in curves.items():
                layer, kind = key.split(".")
                removed = [i / max(len(retained) - 1, 1) for i in range(len(retained))]
                ax.plot(removed, retained, color=colors(int(layer) / layer_count),
                        linestyle="-" if kind == "mlp" else "--", linewidth=0.8)
            threshold = self["allocation"].get("threshold")
            ax.set_xlabel("fraction of units removed (in pruning order)")
            output_error = self["allocation"].get("mode") == "output_error"
            ax.set_ylabel("output error retained" if output_error else "variance retained")
            title = ("output-error curves (dashed: heads)" if output_error else
                     "cumulative-variance curves (dashed: heads)" if isinstance(threshold, (int, float)) else "curves")
            ax.set_title(title, fontsize=9)
        if ppl:
            ax = axes[0][len(panels) + bool(curves)]
            ax.bar(list(ppl), list(ppl.values()), color=["grey", "tab:blue"][: len(ppl)])
            ax.set_ylabel("perplexity")
            ax.set_title(_against_dense(self.get("metrics", {})), fontsize=8)
        if rounds:
            self._plot_rounds(axes[0][count - 1], rounds)
        fig.suptitle(f"{self.get('method')} {self.get('sparsity', 0):.0%} of {', '.join(self.get('targets', []))}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    @staticmethod
    def _plot_rounds(ax, rounds: list[dict]) -> None:
        """The iterative block search: each round's CKA of the block and the unit candidate, the kept one filled."""
        for name, color in (("block", "tab:orange"), ("units", "tab:blue")):
            points = [(r["round"], r[name]["cka"], r["kept"] == name) for r in rounds if r.get(name)]
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, linewidth=0.8, label=name)
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, s=18,
                       facecolors=[color if kept else "none" for _, _, kept in points])
        ax.set_xlabel("round")
        ax.set_ylabel("CKA with the dense model (held out)")
        ax.set_title("iterative search (filled: kept)", fontsize=9)
        ax.legend(fontsize=8)


def _against_dense(metrics: dict) -> str:
    """'KL text 0.597, chat 0.777 nats/token; 0% unanswered' from the dense-reference metrics ('' without them)."""
    parts = [f"{label} {metrics[key]:.3f}" for key, label in (("kl_text", "KL text"), ("kl_chat", "chat"))
             if isinstance(metrics.get(key), (int, float))]
    share = metrics.get("empty_reply_share")
    text = ", ".join(parts) + (" nats/token" if parts else "")
    return text + (f"; {share:.0%} unanswered" if isinstance(share, (int, float)) else "")
