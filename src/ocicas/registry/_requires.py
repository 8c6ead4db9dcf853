"""Imported first by :mod:`ocicas.registry`: without httpx, say in one line how to install it.

httpx imports its command line (click, rich and pygments: ≈6 MiB of memory and
a tenth of a second) when imported, only to offer ``httpx.main``. Unless httpx is
already loaded, a stand-in takes that place during the import and loads the real
one when called; the stand-in leaves ``sys.modules`` once httpx is imported.
"""

import sys
import types
from typing import Any


def _cli_main(*args: Any, **kwargs: Any) -> Any:
    """httpx's command line, imported on first use."""
    import importlib

    return importlib.import_module("httpx._main").main(*args, **kwargs)


_stand_in = None
if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
    _stand_in = types.ModuleType("httpx._main")
    _stand_in.main = _cli_main  # type: ignore[attr-defined]
    sys.modules["httpx._main"] = _stand_in
try:
    import httpx as _httpx
except ModuleNotFoundError as exc:
    if exc.name != "httpx":  # httpx is there but broken: show the real error
        raise
    raise ModuleNotFoundError(
        "the ocicas registry engine needs httpx: pip install 'ocicas[registry]'", name="httpx"
    ) from None
finally:
    if _stand_in is not None and sys.modules.get("httpx._main") is _stand_in:
        del sys.modules["httpx._main"]
del _httpx, _stand_in
