"""The per-layer record of a pruning run: what each layer was and became.

One :class:`LayerRecord` per layer of the pruned model: built from its sites' parts
(``Site.describe``), stored in checkpoints, read back on resume, turned into the report's
``layers`` entries (``to_dict``, the JSON schema below) and into the pruned config's shapes.

Keys of a record's dict form: ``layer``; ``source_layer`` (the dense model's layer, when blocks were
removed); for each recorded :class:`LayerShape` field its key in ``RECORD_KEYS``, a width preceded by
``<key>_before``; ``<site>_ridge``, the held-out ridge of a site's reconstruction (docs/design.md §3.8);
``<site>_decision``, the candidate decision chosen on held-out tokens (ordering='heldout', §3.12).
In a record, a bias flag means "added by this run".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..models.modeling_hf_snp import LayerShape

# LayerShape field -> key of the record (the widths also have a "<key>_before")
RECORD_KEYS: dict[str, str] = {
    "intermediate_size": "mlp_width",
    "mlp_output_bias": "mlp_output_bias_added",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "attention_output_bias": "attention_output_bias_added",
    "expert_intermediate_size": "expert_width",
    "num_experts": "num_experts",
    "shared_expert_intermediate_size": "shared_expert_width",
}
# which target owns a field: a record carries a target's keys only when that target was pruned
MLP_FIELDS = ("intermediate_size", "mlp_output_bias")
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "attention_output_bias")
RIDGE_SUFFIX = "_ridge"
CHOICE_SUFFIX = "_decision"


@dataclass(frozen=True)
class LayerRecord:
    """One layer's record: its recorded fields' widths before and shape after, held-out ridges, source layer."""

    layer: int
    before: LayerShape = LayerShape()  # the widths before pruning (no biases)
    after: LayerShape = LayerShape()  # the shape after pruning (biases: added by this run)
    fields: tuple[str, ...] = ()  # the LayerShape fields recorded (the pruned targets'), in order
    ridges: dict[str, float] = field(default_factory=dict)  # per site ("mlp", "heads", "expert_3", ...)
    source_layer: int | None = None  # the dense model's layer, when blocks were removed
    choices: dict[str, str] = field(default_factory=dict)  # per site: the decision chosen on held-out tokens

    @property
    def changed(self) -> bool:
        """Whether pruning changed a recorded width."""
        return any(getattr(self.before, f) != getattr(self.after, f) for f in self.fields if f in LayerShape.WIDTHS)

    def with_part(self, part: "LayerRecord") -> "LayerRecord":
        """This record with a site's part (``Site.describe``) added: its fields, widths before, shape and ridge."""
        fields = self.fields + tuple(f for f in part.fields if f not in self.fields)
        return dataclasses.replace(self, before=self.before.updated(part.before), fields=fields,
                                   after=self.after.updated(part.after), ridges={**self.ridges, **part.ridges},
                                   choices={**self.choices, **part.choices})

    def after_cut(self, later: "LayerRecord") -> "LayerRecord":
        """This layer after a later cut that ``later`` records: its shape and ridges; the widths before stay ours."""
        return dataclasses.replace(self, after=self.after.updated(later.after), ridges={**self.ridges, **later.ridges},
                                   choices={**self.choices, **later.choices})

    def to_dict(self) -> dict:
        """The report's (and the checkpoint's) JSON form."""
        record: dict = {"layer": self.layer}
        if self.source_layer is not None:
            record["source_layer"] = self.source_layer
        for name in self.fields:
            key = RECORD_KEYS[name]
            if name in LayerShape.WIDTHS:
                record[key + "_before"] = getattr(self.before, name)
            record[key] = getattr(self.after, name)
        record.update({site + RIDGE_SUFFIX: ridge for site, ridge in self.ridges.items()})
        record.update({site + CHOICE_SUFFIX: choice for site, choice in self.choices.items()})
        return record

    @classmethod
    def from_dict(cls, data: dict) -> "LayerRecord":
        """Read a record's JSON form (a report's ``layers`` entry, a checkpoint's record)."""
        by_key = {key: name for name, key in RECORD_KEYS.items()}
        known = {"layer", "source_layer", *by_key, *(key + "_before" for key in by_key)}
        unknown = [key for key in data if key not in known and not key.endswith((RIDGE_SUFFIX, CHOICE_SUFFIX))]
        if unknown or "layer" not in data:
            raise ValueError(f"not an hf_snp layer record (keys {sorted(data)}; unknown {unknown}): it was written by "
                             "another hf_snp version; read it with that version, or prune again")
        fields = tuple(by_key[key] for key in data if key in by_key)
        before = {name: data.get(RECORD_KEYS[name] + "_before") for name in fields if name in LayerShape.WIDTHS}
        after = {name: data[RECORD_KEYS[name]] for name in fields}
        ridges = {key[: -len(RIDGE_SUFFIX)]: value for key, value in data.items() if key.endswith(RIDGE_SUFFIX)}
        choices = {key[: -len(CHOICE_SUFFIX)]: value for key, value in data.items() if key.endswith(CHOICE_SUFFIX)}
        return cls(data["layer"], LayerShape(**before), LayerShape(**after), fields, ridges, data.get("source_layer"),
                   choices)
