"""Opening a registry engine: location, credentials, TLS and the HTTP client."""

from __future__ import annotations

import os
import ssl
from typing import Final

import httpx

from .._engine import CHUNK_SIZE
from .._errors import InvalidError
from .._threads import run_sync
from ._auth import Authenticator, Credentials, load_docker_credentials
from ._engine import RegistryEngine
from ._location import RegistryLocation, parse_registry_location
from ._net import big_reads
from ._transport import RegistryClient, RetryPolicy

__all__ = ["open_registry"]

_USER_AGENT: Final = "ocicas (python-httpx)"


def _ssl_context(verify: bool | str | os.PathLike[str] | ssl.SSLContext) -> ssl.SSLContext:
    """Build the TLS context (reads CA files: run it in a worker thread)."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is True:
        return httpx.create_ssl_context()
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    path = os.fspath(verify)
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    return ssl.create_default_context(cafile=path)


async def open_registry(
    location: str | RegistryLocation,
    *,
    username: str | None = None,
    password: str | None = None,
    docker_config: bool | str | os.PathLike[str] = True,
    verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
    request_timeout: float | httpx.Timeout = 60.0,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
    chunk_size: int = CHUNK_SIZE,
    transport: httpx.AsyncBaseTransport | None = None,
    check: bool = True,
) -> RegistryEngine:
    """Open repository ``location`` (``http://127.0.0.1:5000/team/app``; ``https`` by default) as an engine.

    Credentials are ``username``/``password``, or else those a Docker ``config.json``
    holds for the registry (``docker_config``: ``True`` for ``$DOCKER_CONFIG`` or
    ``~/.docker/config.json``, a path, or ``False``); anonymous otherwise. ``verify``
    is ``True`` (system CAs), ``False``, a CA bundle path or an ``ssl.SSLContext``.
    ``request_timeout`` bounds each network wait (seconds, or an ``httpx.Timeout``),
    ``concurrency`` bounds the requests in flight, ``retry`` sets the retries of
    idempotent requests, ``chunk_size`` the size of chunked uploads, and
    ``transport`` replaces httpx's network transport (tests). With ``check``, the
    registry is asked ``GET /v2/`` first: :class:`~ocicas.RegistryUnreachableError`,
    :class:`~ocicas.AccessDeniedError` or :class:`~ocicas.InvalidError` say why it
    cannot be used.
    """
    if isinstance(location, str):
        location = parse_registry_location(location)
    if location.reference is not None:
        raise InvalidError(f"open_registry takes a repository, not a tag or digest: {location}")
    if (username is None) != (password is None):
        raise ValueError("pass both username and password, or neither")
    credentials: Credentials | None = None
    if username is not None and password is not None:
        credentials = Credentials(username, password)
    elif docker_config is not False:
        path = None if docker_config is True else docker_config
        credentials = await load_docker_credentials(location.host, path)

    timeouts = (
        request_timeout
        if isinstance(request_timeout, httpx.Timeout)
        else httpx.Timeout(request_timeout, connect=min(request_timeout, 15.0))
    )

    def client() -> httpx.AsyncClient:  # reads CA files and the environment: off the event loop
        return httpx.AsyncClient(
            verify=_ssl_context(verify),
            timeout=timeouts,
            transport=transport,
            headers={"User-Agent": _USER_AGENT},
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=concurrency),
        )

    http = await run_sync(client)
    if transport is None:
        big_reads(http)
    authenticator = Authenticator(credentials, f"repository {location.repository!r} on registry {location.base_url}")
    engine = RegistryEngine(
        RegistryClient(http, location, authenticator, concurrency=concurrency, retry=retry or RetryPolicy()),
        chunk_size=chunk_size,
    )
    if check:
        try:
            await engine.ping()
        except BaseException:
            await engine.close()
            raise
    return engine
