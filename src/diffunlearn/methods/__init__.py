"""The method registry: an explicit dict keyed by the name used in configs and on the CLI."""

from __future__ import annotations

from ..errors import UserError
from . import aligned_mtl, dualproj, esd, ft, ga, graddiff, imtlg, mgda, rg, rg_flat, rg_opt, rgd, salun, uce, upgrad
from .base import Method

METHODS: dict[str, Method] = {m.name: m for m in (ga.METHOD, graddiff.METHOD, rg.METHOD, rgd.METHOD, rg_opt.METHOD,
                                                   esd.ESD_U, esd.ESD_X, salun.METHOD, ft.METHOD, rg_flat.METHOD,
                                                   upgrad.METHOD, mgda.METHOD, dualproj.METHOD, imtlg.METHOD,
                                                   aligned_mtl.METHOD, uce.METHOD)}


def get_method(name: str) -> Method:
    """Look a method up by name.

    Raises:
        UserError: no method has that name.
    """
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
