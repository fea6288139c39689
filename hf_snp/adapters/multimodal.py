"""Vision-language wrappers whose language model is a Llama-family decoder: Gemma 3
(``Gemma3ForConditionalGeneration``) and Llava (``LlavaForConditionalGeneration`` over Llama, Mistral or Qwen2).

The decoder layers are ``model.language_model.layers`` and their shapes live in ``config.text_config``
(``shape_config``). hf_snp prunes the language model from text calibration (the wrappers run on token ids alone)
and leaves the vision tower and the projector as they are. A uniform result saves as the stock wrapper class
(``text_config`` narrower); otherwise the wrapper's variable-width type carries ``hf_snp_layers`` at the top of
its config, like every other family's.
"""

from transformers import PretrainedConfig

from .base import LlamaFamilyAdapter, register_adapter


class VisionLanguageAdapter(LlamaFamilyAdapter):
    family = "Vision-language (Llama-family text tower)"
    model_types = ("gemma3", "llava")
    layers_path = "model.language_model.layers"
    auto_class = "AutoModelForImageTextToText"
    text_model_types = LlamaFamilyAdapter.model_types  # what the language model may be

    def shape_config(self, config: PretrainedConfig) -> PretrainedConfig:
        return config.text_config

    def check_run(self, config, model_config: PretrainedConfig) -> None:
        text_type = self.shape_config(model_config).model_type
        if text_type not in self.text_model_types:
            raise ValueError(f"hf_snp prunes the language model of a {model_config.model_type} model when it is one "
                             f"of {list(self.text_model_types)}; this one's text_config is {text_type!r}")
        super().check_run(config, model_config)


register_adapter(VisionLanguageAdapter())
