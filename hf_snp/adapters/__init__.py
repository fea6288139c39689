"""Architecture adapters, one per model family."""

from . import fused, llama, moe, multimodal, opt, vit  # noqa: F401  (registers the adapters)
from .base import ModelAdapter, adapter_for_type, get_adapter, register_adapter, support_table, supported_families

__all__ = ["ModelAdapter", "adapter_for_type", "get_adapter", "register_adapter", "support_table", "supported_families"]
