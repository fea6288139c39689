"""Recipes: YAML files of prune() arguments. Explicit arguments override recipe fields."""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

import yaml

METADATA_KEYS = ("description",)
NOT_IN_RECIPES = ("tokenizer", "recipe")  # objects, not settings


class RecipeError(ValueError):
    """A recipe names an unknown field or is not a mapping."""


def recipe_fields(func: Callable) -> list[str]:
    return [name for name in inspect.signature(func).parameters if name not in NOT_IN_RECIPES]


def load_recipe(recipe: str | dict, allowed: list[str]) -> dict[str, Any]:
    """Read a recipe (path or dict), check its keys, drop metadata keys."""
    source = recipe if isinstance(recipe, str) else "recipe"
    if isinstance(recipe, str):
        if not os.path.exists(recipe):
            raise FileNotFoundError(f"recipe file {recipe!r} does not exist")
        with open(recipe, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of prune() arguments, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(allowed) - set(METADATA_KEYS))
    if unknown:
        raise RecipeError(f"{source}: unknown recipe key(s) {unknown}; "
                          f"allowed keys: {sorted([*allowed, *METADATA_KEYS])}")
    return {k: v for k, v in recipe.items() if k not in METADATA_KEYS}


def accepts_recipe(func: Callable) -> Callable:
    """Give ``func`` a ``recipe=`` argument: its fields fill every argument the caller did not pass."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, recipe: str | dict | None = None, **kwargs):
        if recipe is None:
            return func(*args, **kwargs)
        explicit = signature.bind_partial(*args, **kwargs).arguments
        return func(**{**load_recipe(recipe, recipe_fields(func)), **explicit})

    parameters = [*signature.parameters.values(),
                  inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None)]
    wrapper.__signature__ = signature.replace(parameters=parameters)
    return wrapper
