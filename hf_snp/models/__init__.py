"""hf_snp's variable-width model type, registered with the transformers Auto classes for each family."""

from __future__ import annotations

import transformers
from transformers import CONFIG_MAPPING, AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from .modeling_hf_snp import head_dim_of, variable_width_config_class, variable_width_model_class

__all__ = ["head_dim_of", "register_variable_width_types", "stock_model_classes", "variable_width_config_class",
           "variable_width_model_class"]


def stock_model_classes(model_type: str, auto_class: str) -> tuple[type, ...]:
    """The stock classes ``auto_class`` loads for ``model_type`` (several for DeiT's two heads)."""
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(f"transformers has no model_type {model_type!r}; hf_snp derives its variable-width type "
                         "from the stock transformers classes")
    found = getattr(transformers, auto_class)._model_mapping[CONFIG_MAPPING[model_type]]
    return tuple(found) if isinstance(found, (tuple, list)) else (found,)


def register_variable_width_types(model_type: str, auto_class: str, layout) -> None:
    """Register ``hf_snp_<model_type>`` with AutoConfig and ``auto_class``; ``layout(config)`` is the family's
    layout for checkpoints saved without ``hf_snp_layout``. Saved checkpoints carry ``auto_map`` and the code
    file, so they load without hf_snp installed."""
    config_cls = variable_width_config_class(CONFIG_MAPPING[model_type])
    model_classes = tuple(variable_width_model_class(stock) for stock in stock_model_classes(model_type, auto_class))
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    # a tuple, as transformers maps deit itself: the class is chosen by config.architectures
    registered = model_classes[0] if len(model_classes) == 1 else model_classes
    getattr(transformers, auto_class).register(config_cls, registered, exist_ok=True)
    config_cls.register_for_auto_class()
    for model_cls in model_classes:
        model_cls.default_layout = staticmethod(layout)
        model_cls.register_for_auto_class(auto_class)
