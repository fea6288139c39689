"""PruneConfig: every option of a pruning run, declared once and validated before any long work starts.

Each field carries its help text and how it is spelled on the command line. ``hf_snp.prune`` takes the fields as
keywords, recipes take them as keys, the CLI's flags are generated from them (``hf_snp.cli``), the report records them.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch

SUPPORTED_TARGETS = ("mlp", "heads", "blocks", "experts")
ALLOCATIONS = ("uniform", "cumulative_variance", "output_error", "global")  # "global": cumulative_variance
DTYPES = ("auto", "float32", "bfloat16", "float16")
RECONSTRUCTION_TARGETS = ("pruned", "dense")
WITHIN_BLOCK = ("joint", "sequential")
BLOCK_SEARCHES = ("iterative", "candidates")
RIDGES = ("fixed", "heldout")
ORDERINGS = ("zca", "natural", "random", "output_aware", "obs", "variance", "heldout")
GQA_MODES = ("per_group", "kv_groups")
QUANTIZATIONS = ("int8_weight_only", "int8_dynamic")  # int4 weight-only (tinygemm) needs CUDA and 128-wide groups

# Options whose values a registry holds (users register methods): the registry hands its names to config (a leaf).
_REGISTERED: dict[str, Callable[[], Any]] = {}


def register_choices(name: str, names: Callable[[], Any]) -> None:
    """Let a registry supply the allowed values of option ``name`` (called when the registry is imported)."""
    _REGISTERED[name] = names


def registered_choices(name: str) -> tuple:
    """The values a registry currently allows for option ``name``."""
    return tuple(_REGISTERED[name]()) if name in _REGISTERED else ()

# What a field is for. "pruning" fields decide the result (the report's top level and the checkpoint
# fingerprint); the others say where the model comes from, where it runs and where it goes.
PRUNING, DATA, LOADING, RUNNING, OUTPUT = "pruning", "data", "loading", "running", "output"


def _dtype_choices() -> tuple:
    """The dtype names and the torch dtypes they name (torch is imported when a value is checked, not before)."""
    import torch

    return (*DTYPES, *(getattr(torch, name) for name in DTYPES[1:]))


def option(default: Any, help: str, group: str = PRUNING, *, choices: Callable[[], Any] | tuple | None = None,
           parse: str | None = None, flags: tuple[str, ...] = ()) -> Any:
    """A PruneConfig field with its help text. ``parse`` names the CLI parser for values that are not
    plain numbers or strings ("per_target_int", "per_target_float", "yaml"); ``flags`` are extra
    CLI spellings."""
    metadata = {"help": help, "group": group, "choices": choices, "parse": parse, "flags": flags}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PruneConfig:
    """What to prune and how, where the model comes from, where it runs and where the result goes."""

    method: str = option("snp", "'snp' (least-squares reconstruction), 'vbp' (variance + mean shift), or a baseline: "
                                "'flap', 'wanda_sp', 'magnitude', 'random'",
                         choices=lambda: registered_choices("method"))
    sparsity: float = option(0.3, "fraction of the targeted modules' parameters to remove, in [0, 1)")
    targets: tuple[str, ...] = option(
        ("mlp",), "what to prune, comma-separated: 'mlp' (MLP neurons; in a mixture of experts every expert's), "
                  "'heads' (attention heads), 'experts' (whole routed experts, lowest routed-output energy first), "
                  "'blocks' (whole blocks; the budget is then `sparsity` of all decoder-layer parameters, and with "
                  "unit targets as well block removal, unit removal and a mix are compared by final-state CKA)")
    allocation: str | None = option(
        None, "'uniform' (default): every layer loses the same fraction, one pass; two passes, one threshold on the "
              "cost curves of all sites deciding each width: 'cumulative_variance' (the paper's: each method's costs "
              "as a fraction of the site's, for SNP the variance lost; 'global' is a deprecated alias) or "
              "'output_error' (the consumer-output error each step adds, per parameter removed, relative to the "
              "residual-stream energy at the layer, within allocation_band of uniform)", choices=ALLOCATIONS)
    allocation_band: float = option(0.1, "with allocation='output_error': each site removes between its uniform "
                                         "fraction minus and plus this much of its own parameters (0: uniform "
                                         "widths), in [0, 1)")
    allocation_samples: int | None = option(None, "with a global allocation: the calibration windows (the first "
                                                   "ones) its dense pass takes the cost curves from; default: a "
                                                   "quarter, at least as many tokens as the widest site has units")
    block_search: str = option(
        "candidates", "with 'blocks' and unit targets: 'iterative' removes the budget in rounds of one block's "
                      "worth, each keeping a block or an equal-size unit cut, whichever keeps the higher CKA of the "
                      "final-norm states on held-out windows; 'candidates' compares three one-shot subnetworks "
                      "(blocks, units, half and half)", choices=BLOCK_SEARCHES)
    sparsity_per_target: dict[str, float] | None = option(None, "a budget per target, e.g. mlp=0.3,heads=0.1",
                                                          parse="per_target_float")
    layer_sparsity: dict[int, float] | None = option(None, "per-layer override of `sparsity`: {layer: fraction} or a "
                                                           "list (YAML on the command line: '{0: 0.1, 5: 0.5}')",
                                                     parse="yaml")
    round_to: int | dict[str, int] | None = option(None, "widths a multiple of N (MLP neurons), or per target: "
                                                         "mlp=64,heads=2; default: kept MLP widths a multiple of 8 "
                                                         "(rounded up) from 128 neurons; 1: any width",
                                                   parse="per_target_int")
    min_width: int | dict[str, int] | None = option(None, "the fewest units a site keeps (MLP neurons), or per target: "
                                                          "mlp=256,heads=1", parse="per_target_int")
    gqa_mode: str = option("per_group", "grouped-query attention: 'per_group' removes the same number of query heads "
                                        "from every KV group (k/v stay); 'kv_groups' removes whole KV groups",
                           choices=GQA_MODES)
    damping: float = option(1e-6, "lambda of lambda*mean(diag) added to the statistics before factoring them")
    add_bias: bool | None = option(None, "allow adding a bias to a consumer that has none (default: the method "
                                         "decides; VBP adds one for its mean shift, SNP keeps the stock architecture)")
    ordering: str | None = option(None, "SNP: which units go first: 'obs' (the default with reconstruction: the least "
                                        "added output error given the reconstruction so far, structured OBS), 'zca' "
                                        "(the default without; unnormalised-ZCA pivots), 'heldout' (per site, the "
                                        "one of OBS+map, ZCA+map and VBP's variance order+mean shift that predicts "
                                        "held-out tokens best), 'variance', 'natural', 'random', 'output_aware'",
                           choices=ORDERINGS)
    reconstruct: bool = option(True, "SNP ablation: False skips the least-squares reconstruction (means only)")
    reconstruction_target: str = option(
        "pruned", "SNP: what the least-squares reconstruction fits: 'pruned' (the removed units, on the pruned "
                  "model's stream) or 'dense' (the dense model's consumer output, from its hidden states streamed "
                  "beside the pruned ones)", choices=RECONSTRUCTION_TARGETS)
    within_block: str = option(
        "joint", "with heads and MLP pruned in one block: 'joint' takes both sites' statistics before either is cut; "
                 "'sequential' cuts the heads first and takes the MLP statistics on the cut attention's outputs "
                 "(a second statistics run)", choices=WITHIN_BLOCK)
    ridge: str | None = option(
        None, "SNP: the ridge of the least-squares reconstruction: 'heldout' (the default for "
              "reconstruction_target='pruned': per site, the lambda of a grid whose map, fitted on the other folds of "
              "the calibration tokens, best predicts the last fold's consumer output; reported as mlp_ridge / "
              "heads_ridge) or 'fixed' (`damping`)", choices=RIDGES)
    ridge_folds: int = option(2, "folds of the calibration tokens for ridge='heldout' (2 to 4): the last is held out")
    post_norm_weights: bool = option(True, "SNP: where a norm follows a site's consumer output (Gemma 2/3, OLMo 2), "
                                           "measure errors after it (tokens weighted by 1/RMS^2, outputs by its gain)")
    swaps: int = option(0, "SNP: after the greedy choice of each site, at most this many swaps of a removed unit (or "
                           "head) with a kept one of the same pool, each the one that lowers the least-squares "
                           "output error most, while it falls (OSSCAR's local search); 0: off")
    calibration: Any = option(
        None, "default: for a model with a chat template {'self': 0.75, 'wikitext2': 0.25} (three quarters text the "
              "model writes itself in its template, before pruning), else 'wikitext2'. Text: 'wikitext2', 'c4', "
              "'wikitext2-local', 'chat-local', 'self', a .txt/.jsonl path (a 'messages' field: conversations), a "
              "list of strings or of message lists, a datasets.Dataset, a LongTensor [N, L] of token ids, or a "
              "mixture {source: share}; images: a folder, a datasets.Dataset with an image column, a list of PIL "
              "images, a pixel_values tensor, or a Hub dataset id 'name[:split]' (YAML on the command line)", DATA,
        parse="yaml")
    num_samples: int = option(128, "calibration windows (or images) drawn from the source", DATA)
    seq_len: int = option(2048, "tokens per calibration window", DATA)
    seed: int = option(0, "seed of the calibration draw (and of the random baselines)", DATA)
    batch_size: int = option(8, "calibration windows per forward call", DATA)
    gguf_file: str | None = option(None, "a GGUF file inside `model` (a directory or Hub id)", LOADING)
    dtype: str | torch.dtype = option("auto", "dtype the model is loaded in: 'auto' (the checkpoint's), 'float32', "
                                              "'bfloat16' or 'float16' (or a torch.dtype)", LOADING,
                                      choices=_dtype_choices)
    device_map: Any = option(None, "accelerate device map for loading ('auto', or YAML: '{model.layers.0: cpu}')",
                             LOADING, parse="yaml")
    max_memory: dict | None = option(None, "accelerate memory budget per device (YAML: '{0: 8GiB, cpu: 64GiB}')",
                                     LOADING, parse="yaml")
    offload_folder: str | None = option(None, "folder for weights offloaded to disk", LOADING)
    trust_remote_code: bool = option(False, "allow the model's own code from the Hub", LOADING)
    device: str | None = option(None, "execution device for each block (default: the GPU when there is one)", RUNNING)
    activation_device: str | None = option(None, "where calibration hidden states wait between blocks "
                                                 "(default: the execution device)", RUNNING)
    checkpoint_dir: str | None = option(None, "save the state after each block there (pruned blocks and records)",
                                        RUNNING)
    resume: bool = option(False, "continue the run checkpointed in checkpoint_dir (same model, calibration and "
                                 "settings); the result is bit-identical to an uninterrupted run", RUNNING)
    progress: bool = option(True, "show progress bars", RUNNING)
    measure_speed: bool = option(False, "measure prefill and decode speed on the execution device before and after "
                                        "pruning; the report and the model card show the speed-ups",
                                 RUNNING)
    quantize: str | None = option(None, "after pruning, quantize the linear layers with torchao through transformers "
                                        "(TorchAoConfig): 'int8_weight_only' or 'int8_dynamic' (int8 weights and "
                                        "activations); result.model and the saved checkpoint are "
                                        "quantized (they load with from_pretrained where torchao is installed)",
                                  OUTPUT, choices=QUANTIZATIONS)
    output_dir: str | None = option(None, "save the model, its tokenizer (or image processor), the report and a "
                                          "model card there", OUTPUT, flags=("--out",))
    overwrite: bool = option(False, "allow replacing a non-empty output_dir", OUTPUT)
    base_model: str | None = option(None, "the Hub id of the model being pruned, for the model card and report "
                                          "(default: from the source, its config or its GGUF metadata; a local "
                                          "path is never written)", OUTPUT)
    evaluate: str | None = option(
        None, "compare the pruned model with the dense one (KL divergence and top-1 agreement on held-out "
              "WikiText-2 and on the dense model's replies to shipped chat prompts, the share of empty replies; into "
              "report['metrics']): 'dense' computes the dense reference before pruning (saved under output_dir/"
              "dense_reference), a folder path reuses the reference saved there or computes and saves it there",
        OUTPUT)
    push_to_hub: str | None = option(None, "a Hub repository ('user/name') to upload the saved model to", OUTPUT)
    private: bool = option(False, "make a new Hub repository private", OUTPUT)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if self.layer_sparsity is not None and not isinstance(self.layer_sparsity, Mapping):
            self.layer_sparsity = dict(enumerate(self.layer_sparsity))
        if self.sparsity_per_target is not None:
            self.sparsity_per_target = dict(self.sparsity_per_target)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "PruneConfig":
        """A config from keyword options; an unknown name is an error that lists the known ones."""
        unknown = sorted(set(options) - set(config_fields()))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; the options are the fields of hf_snp.PruneConfig: "
                            f"{sorted(config_fields())}")
        return cls(**options)

    @property
    def resolved_allocation(self) -> str:
        """'uniform' unless asked (on SmolLM2 every global criterion measured so far lost to it), else 'global': a
        dense statistics pass, then one threshold on cost curves (which ones: ``allocation_criterion``)."""
        return "uniform" if self.allocation in (None, "uniform") else "global"

    @property
    def allocation_criterion(self) -> str | None:
        """What global allocation's threshold cuts: 'cumulative_variance' (also spelled 'global') or
        'output_error'; None under uniform allocation (docs/design.md §6.3, §6.4)."""
        if self.resolved_allocation == "uniform":
            return None
        return "cumulative_variance" if self.allocation == "global" else self.allocation

    @property
    def resolved_ordering(self) -> str:
        """SNP's order unless asked: 'obs' with reconstruction, 'zca' without (issue 15: OBS with held-out ridge gave
        the lowest perplexity at 10-50% of SmolLM2's MLP, benchmarks/results/model_aware.md)."""
        return self.ordering or ("obs" if self.reconstruct else "zca")

    @property
    def resolved_ridge(self) -> str:
        """SNP's ridge unless asked: 'heldout' where it applies (reconstructing the pruned stream), else 'fixed'."""
        if self.ridge is not None:
            return self.ridge
        applies = self.method == "snp" and self.reconstruct and self.reconstruction_target == "pruned"
        return "heldout" if applies else "fixed"

    @property
    def unit_targets(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t != "blocks")

    def target_sparsity(self, target: str) -> float:
        return float((self.sparsity_per_target or {}).get(target, self.sparsity))

    def sparsity_of_layer(self, index: int) -> float:
        return float((self.layer_sparsity or {}).get(index, self.sparsity))

    def validate(self, num_layers: int | None = None) -> "PruneConfig":
        """Raise ValueError naming the bad field and the fix; returns self."""
        self._validate_budget()
        self._validate_choices()
        for name in ("num_samples", "seq_len", "batch_size", "allocation_samples"):
            value = getattr(self, name)
            if (value is not None or name != "allocation_samples") and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.damping, (int, float)) and 0 <= self.damping < 1):
            raise ValueError(f"damping must be in [0, 1) (a fraction of the mean diagonal), got {self.damping!r}")
        for layer, value in (self.layer_sparsity or {}).items():
            _check_fraction(f"layer_sparsity[{layer}]", value)
            if num_layers is not None and not 0 <= int(layer) < num_layers:
                raise ValueError(f"layer_sparsity names layer {layer}, but the model has layers 0..{num_layers - 1}")
        if self.push_to_hub is not None and "/" not in self.push_to_hub:
            raise ValueError(f"push_to_hub={self.push_to_hub!r} should be a repository id like 'user/name'")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the run to resume")
        if self.checkpoint_dir is not None and "blocks" in self.targets:
            raise ValueError("checkpoint_dir / resume cover the per-block unit pruning; block pruning is one dense "
                             "pass (plus the candidates' passes) and is not checkpointed: drop checkpoint_dir")
        return self

    def _validate_budget(self) -> None:
        _check_fraction("sparsity", self.sparsity)
        if not self.targets:
            raise ValueError(f"targets is empty; choose from {SUPPORTED_TARGETS}")
        unknown = [t for t in self.targets if t not in SUPPORTED_TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; supported targets: {SUPPORTED_TARGETS}")
        for target, value in (self.sparsity_per_target or {}).items():
            if target not in self.targets:
                raise ValueError(f"sparsity_per_target names {target!r}, "
                                 f"which is not among targets {list(self.targets)}")
            _check_fraction(f"sparsity_per_target[{target!r}]", value)
        if self.sparsity_per_target and self.layer_sparsity:
            raise ValueError("layer_sparsity and sparsity_per_target cannot be combined; choose one way to set budgets")
        if self.layer_sparsity and self.resolved_allocation == "global":
            raise ValueError("layer_sparsity fixes each layer's budget, which global allocation decides: "
                             "pass allocation='uniform'")
        _check_fraction("allocation_band", self.allocation_band, "of each site's own parameters: 0.1 lets a site "
                        "remove 10 points more or less than uniform")
        for name in ("round_to", "min_width"):
            value = getattr(self, name)
            entries = value.items() if isinstance(value, Mapping) else ([("mlp", value)] if value is not None else [])
            for target, number in entries:
                smallest = 1 if name == "round_to" else 0
                if target not in SUPPORTED_TARGETS or not isinstance(number, int) or isinstance(number, bool) \
                        or number < smallest:
                    raise ValueError(f"{name} must be a positive integer or a {{target: integer}} mapping, "
                                     f"got {value!r}")

    def _validate_choices(self) -> None:
        for spec in fields(self):
            choices = spec.metadata.get("choices")
            if choices is None:
                continue
            allowed = choices() if callable(choices) else choices
            value = getattr(self, spec.name)
            if value is not None and value not in allowed:
                raise ValueError(f"unknown {spec.name} {value!r}; choose one of {list(allowed)}")
        if self.ordering not in (None, "zca") and self.method != "snp":
            raise ValueError(f"ordering={self.ordering!r} is an SNP ablation; "
                             f"it does not apply to method {self.method!r}")
        if self.reconstruction_target == "dense":
            self._validate_dense_target()
        if not isinstance(self.ridge_folds, int) or isinstance(self.ridge_folds, bool) \
                or not 2 <= self.ridge_folds <= 4:
            raise ValueError(f"ridge_folds must be an integer from 2 to 4, got {self.ridge_folds!r}")
        if self.ridge == "heldout" or self.ordering == "heldout":
            self._validate_heldout_ridge()
        self._validate_swaps()
        if "blocks" in self.targets and self.unit_targets and self.block_search == "iterative":
            self._validate_iterative_search()

    def _validate_iterative_search(self) -> None:
        """block_search='iterative' refits on the current model each round, holds windows out (design §7.3)."""
        if self.reconstruction_target == "dense":
            raise ValueError("block_search='iterative' refits each round on the current model; "
                             "reconstruction_target='dense' is not implemented there: use 'pruned' or "
                             "block_search='candidates'")
        if self.num_samples < 2:
            raise ValueError("block_search='iterative' holds out one calibration window in four for its CKA: "
                             "num_samples must be at least 2 (better 8 or more)")

    def _validate_swaps(self) -> None:
        """swaps > 0 searches around SNP's choice on the output error of its least-squares map (docs/design.md §3.9)."""
        if not isinstance(self.swaps, int) or isinstance(self.swaps, bool) or self.swaps < 0:
            raise ValueError(f"swaps must be a non-negative integer (0: no local search), got {self.swaps!r}")
        if self.swaps and (self.method != "snp" or not self.reconstruct):
            raise ValueError("swaps > 0 lowers the output error of SNP's least-squares reconstruction; it needs "
                             "method='snp' and reconstruct=True (or use swaps=0)")

    def _validate_heldout_ridge(self) -> None:
        """ridge='heldout' (SNP's λ, docs/design.md §3.8) and ordering='heldout' (decisions compared on its folds)."""
        if self.ordering == "heldout" and (self.ridge == "fixed" or self.swaps):
            raise ValueError("ordering='heldout' compares SNP's candidate decisions on the held-out folds of "
                             "ridge='heldout': set ridge='heldout' (or leave it unset) and swaps=0")
        if self.method != "snp" or not self.reconstruct:
            raise ValueError("ridge='heldout' chooses the ridge of SNP's least-squares reconstruction; it needs "
                             "method='snp' and reconstruct=True (or use ridge='fixed')")
        if self.reconstruction_target == "dense":
            raise ValueError("ridge='heldout' is not implemented for reconstruction_target='dense' (its cross moments "
                             "are not split into folds): use one of the two")

    def _validate_dense_target(self) -> None:
        """reconstruction_target='dense' is SNP's least-squares map with another target (docs/design.md §3.7)."""
        if self.method != "snp":
            raise ValueError(f"reconstruction_target='dense' changes SNP's least-squares reconstruction; method "
                             f"{self.method!r} does not reconstruct: use method='snp' or "
                             "reconstruction_target='pruned'")
        if not self.reconstruct:
            raise ValueError("reconstruction_target='dense' is a least-squares reconstruction, which "
                             "reconstruct=False turns off: drop one of the two")
        if "experts" in self.targets:
            raise ValueError("reconstruction_target='dense' cannot serve target 'experts' (whole experts are removed "
                             "by routed energy, with nothing reconstructed): drop 'experts' or use 'pruned'")

    def settings(self) -> dict[str, Any]:
        """The fields that decide the result (the report's top level and the checkpoint fingerprint)."""
        data = {spec.name: getattr(self, spec.name) for spec in fields(self)
                if spec.metadata["group"] == PRUNING or spec.name in ("num_samples", "seq_len", "seed", "batch_size")}
        data["targets"] = list(self.targets)
        return _jsonable(data)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable (objects such as a calibration dataset by their type name)."""
        data = asdict(self)
        data["targets"] = list(self.targets)
        return _jsonable(data)


def config_fields() -> dict[str, Any]:
    """name -> dataclasses.Field of every PruneConfig option."""
    return {spec.name: spec for spec in fields(PruneConfig)}


def field_default(spec) -> Any:
    return spec.default_factory() if spec.default is MISSING else spec.default


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): _jsonable(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool, type(None))) for v in value):
        return list(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return f"<{type(value).__name__}>"


def _check_fraction(name: str, value: Any, meaning: str = "e.g. 0.3 removes 30%") -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a fraction in [0, 1) ({meaning}), got {value!r}")
