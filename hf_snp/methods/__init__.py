"""Pruning methods, registered by name."""

from . import baselines, snp, vbp  # noqa: F401  (registers the methods)
from .base import METHODS, PruningMethod, ScoredMethod, SiteInputs, get_method, register_method

__all__ = ["METHODS", "PruningMethod", "ScoredMethod", "SiteInputs", "get_method", "register_method"]
