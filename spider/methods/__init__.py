"""Forgetting-mitigation methods as pluggable hooks for any PyTorch loop (ARCHITECTURE.md, "Methods").

>>> from spider.methods import build_method, available_methods
>>> m = build_method("spider", model)            # doctest: +SKIP
"""

from spider.methods.base import (
    STAT_COLUMNS,
    Method,
    MethodBase,
    available_methods,
    build_method,
    make_options,
    method_class,
    option_fields,
    register,
)

__all__ = [
    "STAT_COLUMNS",
    "Method",
    "MethodBase",
    "available_methods",
    "build_method",
    "make_options",
    "method_class",
    "option_fields",
    "register",
]
