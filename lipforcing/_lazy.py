"""Lazy package attributes: ``import lipforcing`` stays light and heavy modules load on first use."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_attributes(namespace: dict, mapping: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``namespace`` (a package's ``globals()``): ``name`` in ``mapping`` imports
    ``mapping[name]`` and returns its attribute ``name`` (or the module itself when it is called ``name``), cached
    in the namespace."""

    def __getattr__(name: str):
        if name not in mapping:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        module = importlib.import_module(mapping[name])
        value = module if module.__name__.rsplit(".", 1)[-1] == name else getattr(module, name)
        namespace[name] = value
        return value

    return __getattr__
