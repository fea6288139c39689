"""The first phase of a pruning run: everything that can be decided, and refused, before any weights load.

The validated config, where the model comes from, its adapter, the tokenizer or image processor,
the calibration data, the width rules, the checks on shapes, the checkpoint and the devices.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..adapters import ModelAdapter, get_adapter
from ..config import PruneConfig
from ..deliver.quantize import require_torchao
from ..methods import get_method
from ..units.allocation import WidthRules
from .calibration import CalibrationData, is_text_calibration, load_calibration, needs_model
from .checkpoint import Checkpoint, fingerprint
from .conversations import has_chat_template
from .images import ImageCalibrationData, check_modality, load_image_calibration
from .loading import ModelSource, load_config, load_image_processor, load_tokenizer, prepare_loaded_model
from .output_dir import prepare_output_dir
from .preflight import preflight, shape_model
from .prune_run import PruneRun

logger = logging.getLogger("hf_snp")

# modality -> (loader, what it is, the argument that supplies it, the ready-made calibration that needs none)
PREPROCESSORS = {
    "text": (load_tokenizer, "a tokenizer", "tokenizer", "token-id calibration"),
    "image": (load_image_processor, "the model's image processor", "image_processor", "a pixel_values tensor"),
}
# Calibration when none is given, chosen on benchmarks/results/chat.md (docs/results.md): a chat model is calibrated
# mostly on text it writes itself in its own template (which keeps it answering), a quarter WikiText-2 (which keeps
# its perplexity); a model without a chat template on WikiText-2.
CHAT_CALIBRATION = {"self": 0.75, "wikitext2": 0.25}
TEXT_CALIBRATION = "wikitext2"
VOLATILE_CONFIG_KEYS = ("dtype", "torch_dtype", "transformers_version", "architectures", "_name_or_path", "auto_map")


def resolve(model: str | PreTrainedModel, tokenizer: Any, image_processor: Any, config: PruneConfig) -> PruneRun:
    """Validate everything and load what is small (config, preprocessors, calibration) before the weights."""
    config.validate()
    if config.quantize is not None:
        require_torchao(config.quantize)
    if config.output_dir is not None:
        prepare_output_dir(config.output_dir, config.overwrite)
    source, loaded = None, None
    if isinstance(model, str):
        source = ModelSource.parse(model, config.gguf_file)
        model_config = load_config(source, config.trust_remote_code)
    elif isinstance(model, PreTrainedModel):
        model = prepare_loaded_model(model)  # a GGUF-loaded model: drop the quantizer state that blocks saving
        loaded, model_config = model, model.config
    else:
        raise TypeError(f"model must be a Hub id, a local path or a PreTrainedModel, got {type(model).__name__}")
    adapter = get_adapter(model_config)
    adapter.check_run(config, model_config)
    if config.calibration is None and adapter.modality == "image":
        config.calibration = "wikitext2"  # refused just below, saying that images are needed
    check_modality(config.calibration, adapter.modality, adapter.family)
    if source is not None and adapter.modality == "image" and image_processor is None:
        image_processor = _preprocessor_if_available("image", source, config, not _is_pixel_values(config.calibration))
    if source is not None and adapter.modality == "text" and tokenizer is None:
        tokenizer = _preprocessor_if_available("text", source, config, is_text_calibration(config.calibration))
    if config.calibration is None:
        config.calibration = default_calibration(tokenizer)
    written = adapter.modality == "text" and needs_model(config.calibration)  # made after the weights load
    calib = None if written else _load_calibration(adapter, model_config, tokenizer, image_processor, config)
    num_tokens = config.num_samples * config.seq_len if written else calib.num_tokens
    shapes = loaded if loaded is not None else shape_model(model_config, adapter.auto_class, config.trust_remote_code)
    config.validate(num_layers=len(adapter.layers(shapes)))
    rules = WidthRules.build(config.round_to, config.min_width)
    method = get_method(config.method)
    preflight(adapter, shapes, config, method, rules, num_tokens)
    checkpoint = None
    if config.checkpoint_dir is not None:
        digest = fingerprint(config.settings(), architecture(model_config), *(calib.tensors() if calib else ()))
        checkpoint = Checkpoint.open(config.checkpoint_dir, digest, config.resume)
    device = torch.device(config.device) if config.device is not None else default_device()
    store = torch.device(config.activation_device) if config.activation_device is not None else device
    return PruneRun(config, source, loaded, model_config, adapter, tokenizer, image_processor, method, calib, rules,
                    checkpoint, device, store)


def architecture(model_config: PretrainedConfig) -> dict:
    """The config fields that define the model's shapes (not how or where it was loaded)."""
    return {k: v for k, v in model_config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS and not k.startswith("_")}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _preprocessor_if_available(modality: str, source: ModelSource, config: PruneConfig, needed: bool):
    """The model's tokenizer or image processor; an error only when the calibration needs one."""
    loader, what, argument, ready = PREPROCESSORS[modality]
    try:
        return loader(source, config.trust_remote_code)
    except (OSError, ValueError) as error:
        if needed:
            raise ValueError(f"{modality} calibration needs {what}, and none loads from {source.path!r} ({error}); "
                             f"pass {argument}=... or {ready}") from error
        logger.info("no %s loads from %s; the calibration is %s, so none is needed", what, source.path, ready)
        return None


def _load_calibration(adapter: ModelAdapter, model_config: PretrainedConfig, tokenizer, image_processor,
                      config: PruneConfig) -> CalibrationData | ImageCalibrationData:
    """Token windows for a text model, pixel values for an image model."""
    if adapter.modality == "image":
        return load_image_calibration(config.calibration, image_processor, config.num_samples, config.seed,
                                      adapter.tokens_per_sample(model_config))
    return load_calibration(config.calibration, tokenizer, config.num_samples, config.seq_len, config.seed)


def _is_pixel_values(spec: Any) -> bool:
    return isinstance(spec, torch.Tensor) or (isinstance(spec, dict) and "pixel_values" in spec)


def default_calibration(tokenizer: Any) -> Any:
    """The calibration of a text model when none is given: ``CHAT_CALIBRATION`` with a chat template, else
    ``TEXT_CALIBRATION``."""
    return CHAT_CALIBRATION if tokenizer is not None and has_chat_template(tokenizer) else TEXT_CALIBRATION
