"""Pruning methods, registered by name."""

from . import snp, vbp  # noqa: F401  (registers the methods)
from .base import METHODS, Decision, MethodOptions, PruningMethod, RemovalPlan, get_method, register_method, select_by_score

__all__ = ["METHODS", "Decision", "MethodOptions", "PruningMethod", "RemovalPlan", "get_method", "register_method", "select_by_score"]
