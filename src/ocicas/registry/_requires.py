"""Imported first by :mod:`ocicas.registry`: without httpx, say in one line how to install it.

httpx imports its command line (click, rich and pygments: ≈6 MiB of memory and
a tenth of a second) when imported, only to offer ``httpx.main``. Unless httpx is
already loaded, a stand-in takes that place during the import and loads the real
one when called; the stand-in leaves ``sys.modules`` once httpx is imported.

httpcore imports trio when imported (≈0.07 s of CPU, and a ``ldconfig`` run:
trio looks up libc to name its threads), only to use it under trio. Unless trio
is already loaded, a stand-in takes its place the same way: httpcore keeps it,
and it imports the real trio on its first attribute looked up, which only
happens under trio (where trio is loaded already). Without trio installed,
httpcore sees ``trio = None``, as ever.
"""

import importlib.util
import sys
import types
from typing import Any


def _cli_main(*args: Any, **kwargs: Any) -> Any:
    """httpx's command line, imported on first use."""
    import importlib

    return importlib.import_module("httpx._main").main(*args, **kwargs)


class _LazyModule(types.ModuleType):
    """A module imported on its first attribute looked up; then it holds the real module's attributes."""

    def __getattr__(self, name: str) -> Any:
        import importlib

        if sys.modules.get(self.__name__) is self:  # looked up while still standing in: import the real one now
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)  # later lookups find them here, not through this method
        return getattr(real, name)


_stand_ins: dict[str, types.ModuleType] = {}
if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
    _stand_ins["httpx._main"] = types.ModuleType("httpx._main")
    _stand_ins["httpx._main"].main = _cli_main  # type: ignore[attr-defined]
if "httpcore" not in sys.modules and "trio" not in sys.modules and importlib.util.find_spec("trio") is not None:
    _stand_ins["trio"] = _LazyModule("trio")
sys.modules.update(_stand_ins)
try:
    import httpcore as _httpcore  # httpx imports it lazily: here, while trio's stand-in is in place
    import httpx as _httpx
except ModuleNotFoundError as exc:
    if exc.name not in ("httpx", "httpcore"):  # httpx is there but broken: show the real error
        raise
    raise ModuleNotFoundError(
        "the ocicas registry engine needs httpx: pip install 'ocicas[registry]'", name="httpx"
    ) from None
finally:
    for _name, _module in _stand_ins.items():
        if sys.modules.get(_name) is _module:
            del sys.modules[_name]
del _httpcore, _httpx, _stand_ins
