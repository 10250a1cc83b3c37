"""Say which extra to install when a tool needs a package that is not there, instead of a traceback."""

from __future__ import annotations

import importlib.util


def need(module: str, extra: str, what: str) -> None:
    """``SystemExit`` naming the extra to install unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"{what} needs the package {module!r}: pip install -e '.[{extra}]'")
