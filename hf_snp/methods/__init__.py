"""Pruning methods, registered by name."""

from . import baselines, snp, vbp  # noqa: F401  (registers the methods)
from .base import (
    METHODS, ORDERINGS, Decision, MethodOptions, PruningMethod, RemovalPlan, SiteInputs, get_method, group_units,
    register_method, select_by_score,
)

__all__ = ["METHODS", "ORDERINGS", "Decision", "MethodOptions", "PruningMethod", "RemovalPlan", "SiteInputs", "get_method",
           "group_units", "register_method", "select_by_score"]
