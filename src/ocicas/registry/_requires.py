"""Imported first by :mod:`ocicas.registry`: without httpx, say in one line how to install it."""

try:
    import httpx as _httpx
except ModuleNotFoundError as exc:
    if exc.name != "httpx":  # httpx is there but broken: show the real error
        raise
    raise ModuleNotFoundError(
        "the ocicas registry engine needs httpx: pip install 'ocicas[registry]'", name="httpx"
    ) from None
del _httpx
