"""hf_snp's variable-width model types, registered with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling_hf_snp import CAUSAL_LM_TYPES

for _config_cls, _model_cls in CAUSAL_LM_TYPES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)
    # saved checkpoints carry auto_map and this code, so they load without hf_snp installed
    _config_cls.register_for_auto_class()
    _model_cls.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["CAUSAL_LM_TYPES"]
