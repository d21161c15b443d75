"""The method registry: an explicit dict keyed by the name used in configs and on the CLI."""

from __future__ import annotations

from ..errors import UserError
from . import ga, graddiff, rg, rg_flat, rgd
from .base import Method

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (ga, graddiff, rg, rgd, rg_flat)}


def get_method(name: str) -> Method:
    """Look a method up by name.

    Raises:
        UserError: no method has that name.
    """
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
