"""Whether a dotted name that docs or docstrings mention exists."""

from __future__ import annotations

import importlib


def resolves(path: str) -> bool:
    """Whether ``path`` is an importable module, or an attribute (chain) of
    the longest importable module it starts with."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False
