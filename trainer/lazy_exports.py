"""Module attributes loaded on first use (PEP 562), for the packages whose names pull in Lightning.

``__getattr__, __dir__ = lazy_exports(__name__, {"name": "defining.module", ...}, globals())`` in a
package's ``__init__`` makes ``package.name`` import its module only when first asked for, and keep it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
