"""hf_snp's variable-width model types, registered with the transformers Auto classes."""

import transformers
from transformers import AutoConfig

from .modeling_hf_snp import HF_SNP_TYPES, hf_snp_class_for

for _config_cls, _model_classes, _auto_name in HF_SNP_TYPES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    # a tuple, as transformers maps deit itself: the class is chosen by config.architectures
    _registered = _model_classes[0] if len(_model_classes) == 1 else tuple(_model_classes)
    getattr(transformers, _auto_name).register(_config_cls, _registered, exist_ok=True)
    # saved checkpoints carry auto_map and this code, so they load without hf_snp installed
    _config_cls.register_for_auto_class()
    for _model_cls in _model_classes:
        _model_cls.register_for_auto_class(_auto_name)

__all__ = ["HF_SNP_TYPES", "hf_snp_class_for"]
