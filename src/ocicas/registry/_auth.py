"""Registry authentication: credentials, Docker ``config.json``, challenges and bearer tokens.

A request goes out with whatever authorization is cached for its scope. A ``401``
carries ``WWW-Authenticate`` challenges: ``Basic`` is answered with the
credentials; ``Bearer realm=…,service=…,scope=…`` by fetching a token from the
realm (with the credentials as basic auth, if any) and caching it per scope until
it expires. The request is then sent again, once.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import anyio
import httpx

from .._errors import AccessDeniedError, InvalidError, RegistryError
from .._threads import run_sync
from ._streams import body_of

__all__ = [
    "Authenticator",
    "Challenge",
    "Credentials",
    "docker_config_path",
    "load_docker_credentials",
    "parse_challenges",
]

#: Seconds a token is trusted when the token service does not say (distribution's token spec).
_DEFAULT_TOKEN_LIFETIME: Final = 60.0
#: Docker Hub's key in ``config.json``.
_DOCKER_HUB_KEY: Final = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_CONFIG_LIMIT: Final = 1 << 20


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A username and password (or token) for basic authentication; the password never shows in ``repr``."""

    username: str
    password: str = dataclasses.field(repr=False)

    def basic(self) -> str:
        """The ``Authorization`` header value for basic authentication."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    directory = os.environ.get("DOCKER_CONFIG")
    return Path(directory) / "config.json" if directory else Path.home() / ".docker" / "config.json"


def _normalise_key(key: str) -> str:
    """``https://host:port/v1/`` → ``host:port``: how ``config.json`` keys are compared."""
    key = key.strip()
    if "://" in key:
        key = key.partition("://")[2]
    return key.partition("/")[0].lower()


def credentials_from_docker_config(data: bytes, host: str) -> Credentials | None:
    """The credentials ``config.json`` (its bytes) holds for ``host`` (``host[:port]``), or ``None``.

    Entries of ``auths`` are matched by host (a scheme and path in the key are
    ignored; Docker Hub's hosts share one key). An entry's ``auth`` (base64
    ``user:password``) wins over its ``username``/``password``. Credential helpers
    (``credsStore``, ``credHelpers``) are not run.
    """
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise InvalidError(f"Docker config is not valid JSON: {exc}") from None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = host.lower()
    keys = {wanted} | ({_normalise_key(_DOCKER_HUB_KEY)} if wanted in _DOCKER_HUB_HOSTS else set())
    for key, entry in auths.items():
        if not isinstance(key, str) or _normalise_key(key) not in keys or not isinstance(entry, dict):
            continue
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                username, colon, password = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidError(f"Docker config entry {key!r}: auth is not base64 of user:password") from None
            if not colon:
                raise InvalidError(f"Docker config entry {key!r}: auth is not base64 of user:password")
            return Credentials(username, password)
        user, secret = entry.get("username"), entry.get("password")
        if isinstance(user, str) and isinstance(secret, str):
            return Credentials(user, secret)
    return None


async def load_docker_credentials(host: str, path: str | os.PathLike[str] | None = None) -> Credentials | None:
    """Read credentials for ``host`` from a Docker ``config.json`` (default :func:`docker_config_path`).

    A missing file means no credentials.
    """

    def read() -> bytes | None:
        file = Path(path) if path is not None else docker_config_path()
        try:
            with file.open("rb") as f:
                return f.read(_CONFIG_LIMIT + 1)
        except FileNotFoundError:
            return None

    data = await run_sync(read)
    if data is None:
        return None
    if len(data) > _CONFIG_LIMIT:
        raise InvalidError(f"Docker config is over {_CONFIG_LIMIT} bytes")
    return credentials_from_docker_config(data, host)


@dataclasses.dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: its scheme (lowercase) and parameters."""

    scheme: str
    params: Mapping[str, str]


_TOKEN: Final = re.compile(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*")
_VALUE: Final = re.compile(r'\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([!#$%&\'*+.^_`|~0-9A-Za-z/:-]*))\s*')


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (RFC 7235) into challenges; malformed parts are skipped."""
    out: list[Challenge] = []
    for value in values:
        position, scheme, params = 0, "", dict[str, str]()
        while position < len(value):
            if value[position] in ", ":
                position += 1
                continue
            token = _TOKEN.match(value, position)
            if token is None:
                break
            after = _VALUE.match(value, token.end())
            if after is not None and scheme:  # an auth-param of the current challenge
                raw = after.group(1)
                params[token.group(1).lower()] = (
                    re.sub(r"\\(.)", r"\1", raw) if raw is not None else after.group(2) or ""
                )
                position = after.end()
                continue
            if scheme:  # a new scheme starts a new challenge
                out.append(Challenge(scheme, params))
            scheme, params = token.group(1).lower(), {}
            position = token.end()
        if scheme:
            out.append(Challenge(scheme, params))
    return out


#: ``send(url, params, authorization)``: one GET to a token service, with retries.
TokenFetch = Callable[[str, Mapping[str, str | list[str]], str | None], Awaitable[httpx.Response]]


class Authenticator:
    """The authorization state of one registry engine: basic or bearer, tokens cached per scope."""

    def __init__(self, credentials: Credentials | None, where: str) -> None:
        self.credentials = credentials
        self._where = where  # "repository 'team/app' on registry http://…", for messages
        self._basic = False
        self._tokens: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, anyio.Lock] = {}

    def authorization(self, scope: str) -> str | None:
        """The ``Authorization`` header to send for ``scope`` now, or ``None``."""
        cached = self._tokens.get(scope)
        if cached is not None:
            if cached[1] > time.monotonic():
                return f"Bearer {cached[0]}"
            del self._tokens[scope]
        if self._basic and self.credentials is not None:
            return self.credentials.basic()
        return None

    async def answer(self, challenges: list[Challenge], scope: str, sent: str | None, fetch: TokenFetch) -> bool:
        """React to a ``401``; return whether the request is worth sending again with new authorization."""
        by_scheme = {c.scheme: c for c in challenges}
        bearer = by_scheme.get("bearer")
        if bearer is not None and bearer.params.get("realm"):
            lock = self._locks.setdefault(scope, anyio.Lock())
            async with lock:
                current = self.authorization(scope)
                if current is not None and current != sent:
                    return True  # another request fetched a fresh token meanwhile
                token, lifetime = await self._fetch_token(bearer, scope, fetch)
                self._tokens[scope] = (token, time.monotonic() + lifetime * 0.9)
            return True
        if "basic" in by_scheme:
            if self.credentials is None or (self._basic and sent is not None and sent.startswith("Basic ")):
                return False  # nothing to offer, or the credentials were just refused
            self._basic = True
            return True
        return False

    async def _fetch_token(self, challenge: Challenge, scope: str, fetch: TokenFetch) -> tuple[str, float]:
        realm = challenge.params["realm"]
        params: dict[str, str | list[str]] = {}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        scopes = (challenge.params.get("scope") or scope).split()
        if scopes:
            params["scope"] = scopes
        if self.credentials is not None:
            params["account"] = self.credentials.username
        authorization = self.credentials.basic() if self.credentials is not None else None
        response = await fetch(realm, params, authorization)
        if response.status_code in (401, 403):
            who = f"the credentials of user {self.credentials.username!r}" if self.credentials else "anonymous access"
            raise AccessDeniedError(
                f"access denied to {self._where}: the token service {realm} refused {who} "
                f"(HTTP {response.status_code})",
                status=response.status_code,
            )
        if response.status_code != 200:
            raise RegistryError(
                f"token service {realm} for {self._where} answered HTTP {response.status_code}",
                status=response.status_code,
            )
        try:
            body: Any = json.loads(body_of(response))
        except ValueError:
            body = None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token service {realm} for {self._where} sent no token")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = _DEFAULT_TOKEN_LIFETIME
        return token, float(lifetime)
