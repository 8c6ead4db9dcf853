"""Requests to one registry repository: authentication, retries, bounded concurrency, errors.

:meth:`RegistryClient.request` sends one API request and returns its response,
having already dealt with what every call shares:

- authorization (:class:`~ocicas.registry._auth.Authenticator`), answering a ``401``
  once with new credentials or a token;
- retries with exponential backoff and jitter of idempotent requests on ``429`` and
  ``5xx`` (``Retry-After`` is honoured up to ``max_delay``) and on dropped
  connections; non-idempotent ones (upload ``PATCH`` and the ``PUT`` that
  completes an upload) are never sent twice;
- at most ``concurrency`` requests in flight per engine (until their headers arrive);
- ``401``/``403`` become :class:`~ocicas.AccessDeniedError`, network failures
  :class:`~ocicas.RegistryUnreachableError`, both naming the registry and repository.

Other statuses are the caller's to interpret (:meth:`RegistryClient.error` helps).

Bodies are sent and read through :mod:`._streams` (see there why).
"""

from __future__ import annotations

import dataclasses
import email.utils
import errno
import json
import os
import random
import ssl
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import anyio
import httpx

from .._copy import TRANSFER_RETRY
from .._errors import (
    AccessDeniedError,
    InvalidError,
    OCICASError,
    RegistryError,
    RegistryUnreachableError,
    UnsupportedError,
)
from ._auth import Authenticator, parse_challenges
from ._location import RegistryLocation
from ._streams import BODIES, Body, body_of, read_body

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["RETRY_STATUSES", "RegistryClient", "RetryPolicy", "error_codes", "error_list", "note_retry"]

#: Statuses worth retrying an idempotent request on.
RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: Bytes of an error body read to find its error codes.
_ERROR_BODY_LIMIT: Final = 64 << 10


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently idempotent requests are retried."""

    #: Retries after the first attempt (``0``: never retry).
    retries: int = 4
    #: Seconds before the first retry; doubled for each next one, with jitter.
    backoff: float = 0.25
    #: Longest wait between two attempts; a ``Retry-After`` asking for more ends the retries.
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_delay < 0:
            raise ValueError(f"retry settings must not be negative: {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based): exponential, with jitter."""
        return min(self.max_delay, self.backoff * 2.0**attempt) * random.uniform(0.5, 1.0)


def note_retry(client: RegistryClient) -> None:
    """Count one retry: on the client and, inside :func:`ocicas.copy`, for the blob being moved."""
    client.transfer_retries += 1
    hook = TRANSFER_RETRY.get()
    if hook is not None:
        hook()


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception in its cause/context chain, exception groups included."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)


def _connect_reason(exc: httpx.ConnectError) -> str:
    """A backend-independent reason for a failed connection (asyncio and trio word them differently)."""
    chain = list(_chain(exc))
    for error in chain:
        if isinstance(error, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate verification failed: {error.verify_message}; "
                "pass verify= a CA bundle path or an ssl.SSLContext"
            )
    for error in chain:
        if isinstance(error, ssl.SSLError):
            return f"TLS handshake failed: {error.reason or error}"
    for error in chain:
        if isinstance(error, OSError) and error.errno in (
            errno.ECONNREFUSED,
            errno.EHOSTUNREACH,
            errno.ENETUNREACH,
            errno.ETIMEDOUT,
        ):
            return os.strerror(error.errno).lower()
    return str(exc) or type(exc).__name__


class RegistryClient:
    """Sends the requests of one engine to one repository. See the module documentation."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        location: RegistryLocation,
        authenticator: Authenticator,
        *,
        concurrency: int,
        retry: RetryPolicy,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.http = http
        self.location = location
        self.auth = authenticator
        self.retry = retry
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.where = f"repository {location.repository!r} on registry {location.base_url}"
        #: Requests retried and transfers resumed so far (downloads resumed with ``Range``, uploads resumed).
        self.transfer_retries = 0

    def url(self, path: str) -> str:
        """The URL of ``path`` under this repository's API (``blobs/sha256:…``)."""
        return f"{self.location.base_url}/v2/{self.location.repository}/{path}"

    def scope(self, method: str, repository: str | None = None) -> str:
        """The token scope a request needs: pull to read, push to write, delete to delete."""
        action = {"GET": "pull", "HEAD": "pull", "DELETE": "delete"}.get(method, "pull,push")
        return f"repository:{repository or self.location.repository}:{action}"

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | Sequence[bytes] | httpx.AsyncByteStream | None = None,
        params: Mapping[str, str] | None = None,
        scope: str | None = None,
        stream: bool = False,
        follow_redirects: bool = False,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send a request; see the module documentation. A ``stream=True`` response must be closed."""
        retryable = method in _IDEMPOTENT if idempotent is None else idempotent
        scope = scope or self.scope(method)
        attempt = 0
        answered_challenge = False
        while True:
            request = self.http.build_request(method, url, headers=headers, params=params)
            body = None
            if isinstance(content, httpx.AsyncByteStream):  # streamed: the caller gives its Content-Length
                request.stream = content
            elif content is not None:
                length = len(content) if isinstance(content, bytes) else sum(map(len, content))
                request.headers["Content-Length"] = str(length)
                request.stream = body = Body(content)
            authorization = self.auth.authorization(scope)
            if authorization is not None:
                request.headers["Authorization"] = authorization
            try:
                async with self.limiter:
                    try:
                        response = await self.http.send(request, stream=True, follow_redirects=follow_redirects)
                    finally:
                        if body is not None:  # sent (HTTP/1.1 answers after the whole body) or failed
                            body.drop()
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if retryable and attempt < self.retry.retries:
                    await anyio.sleep(self.retry.delay(attempt))
                    attempt += 1
                    note_retry(self)
                    continue
                reason = str(exc) or type(exc).__name__
                raise RegistryUnreachableError(
                    f"connection to {self.where} dropped during {method} {request.url.path}: {reason}"
                ) from exc
            except httpx.TransportError as exc:
                raise self._transport_error(exc, method, request) from exc
            status = response.status_code
            if status == 401 and not answered_challenge:
                answered_challenge = True
                challenges = parse_challenges(response.headers.get_list("www-authenticate"))
                await self._read_error_body(response)
                if await self.auth.answer(challenges, scope, authorization, self._fetch_token):
                    continue
                raise self._denied(response, authorization)
            if status in (401, 403):
                await self._read_error_body(response)
                raise self._denied(response, authorization)
            if status in RETRY_STATUSES and retryable and attempt < self.retry.retries:
                delay = _retry_after(response)
                await response.aclose()
                if delay is None:
                    delay = self.retry.delay(attempt)
                elif delay > self.retry.max_delay:
                    raise RegistryError(
                        f"{self.where} answered HTTP {status} to {method} {request.url.path} and asked to retry "
                        f"after {delay:.0f} s, over the limit of {self.retry.max_delay:.0f} s",
                        status=status,
                    )
                await anyio.sleep(delay)
                attempt += 1
                note_retry(self)
                continue
            if not stream:
                try:
                    BODIES[response] = await read_body(response)
                except httpx.TransportError as exc:
                    raise RegistryUnreachableError(
                        f"connection to {self.where} dropped while reading the answer to {method} "
                        f"{request.url.path}: {exc or type(exc).__name__}"
                    ) from exc
            elif status >= 400:
                await self._read_error_body(response)
            if status in RETRY_STATUSES:
                error = self.error(response, f"{method} {request.url.path}")
                error.retry_after = _retry_after(response)  # for the caller's own retries (an upload step's)
                raise error
            return response

    async def _fetch_token(
        self, url: str, params: Mapping[str, str | list[str]], authorization: str | None
    ) -> httpx.Response:
        attempt = 0
        while True:
            headers = {"Authorization": authorization} if authorization else {}
            try:
                async with self.limiter:
                    request = self.http.build_request("GET", url, params=params, headers=headers)
                    response = await self.http.send(request, stream=True)
                BODIES[response] = await read_body(response, _ERROR_BODY_LIMIT)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt < self.retry.retries:
                    await anyio.sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise RegistryUnreachableError(f"connection to token service {url} dropped: {exc}") from exc
            except httpx.TransportError as exc:
                raise self._transport_error(exc, "GET", httpx.Request("GET", url)) from exc
            if response.status_code in RETRY_STATUSES and attempt < self.retry.retries:
                await anyio.sleep(min(_retry_after(response) or self.retry.delay(attempt), self.retry.max_delay))
                attempt += 1
                continue
            return response

    def _transport_error(self, exc: httpx.TransportError, method: str, request: httpx.Request) -> OCICASError:
        target = f"{request.url.scheme}://{request.url.netloc.decode('ascii')}"
        if isinstance(exc, httpx.ConnectError):
            return RegistryUnreachableError(f"cannot connect to the registry at {target}: {_connect_reason(exc)}")
        if isinstance(exc, httpx.TimeoutException):
            return RegistryUnreachableError(
                f"the registry at {target} did not answer {method} {request.url.path} in time ({type(exc).__name__})"
            )
        if isinstance(exc, httpx.UnsupportedProtocol):
            return InvalidError(f"cannot reach {request.url}: {exc}")
        return RegistryUnreachableError(f"{method} {request.url} failed: {exc or type(exc).__name__}")

    def _denied(self, response: httpx.Response, authorization: str | None) -> AccessDeniedError:
        credentials = self.auth.credentials
        status = response.status_code
        codes = error_codes(response)
        if status == 403:
            who = f"user {credentials.username!r}" if credentials else "anonymous access"
            reason = f"{who} is not allowed to {response.request.method} {response.request.url.path}"
        elif credentials is None:
            reason = (
                "the registry requires authentication: pass username= and password=, or add them to a Docker "
                "config.json"
            )
        else:
            reason = f"the registry refused the credentials of user {credentials.username!r}"
        answer = " ".join([f"HTTP {status}", *codes])
        return AccessDeniedError(f"access denied to {self.where}: {reason} ({answer})", status=status, codes=codes)

    async def _read_error_body(self, response: httpx.Response) -> None:
        """Read a streamed error answer (capped) so its error codes can be reported, then close it."""
        try:
            BODIES[response] = (await read_body(response, _ERROR_BODY_LIMIT))[:_ERROR_BODY_LIMIT]
        except httpx.HTTPError:
            BODIES[response] = b""

    async def head(self, path: str, *, accept: str | None = None) -> httpx.Response | None:
        """``HEAD`` of ``path`` under the repository: the answer if 200, ``None`` if 404."""
        headers = {"Accept": accept} if accept else None
        response = await self.request("HEAD", self.url(path), headers=headers, follow_redirects=True)
        if response.status_code == 200:
            return response
        if response.status_code == 404:
            return None
        raise self.error(response, f"HEAD {path}")

    def dropped(self, what: str, exc: httpx.TransportError) -> RegistryUnreachableError:
        """The error for a connection lost while ``what`` (``"reading blob …"``) was under way."""
        return RegistryUnreachableError(f"connection to {self.where} dropped while {what}: {exc or type(exc).__name__}")

    def delete_refused(self, response: httpx.Response, path: str) -> OCICASError:
        """The error for a ``DELETE`` the registry refused: unsupported if deletes are off."""
        if response.status_code == 405 or "UNSUPPORTED" in error_codes(response):
            return UnsupportedError(
                f"{self.where} does not allow deletes (distribution: storage.delete.enabled is off)"
            )
        return self.error(response, f"DELETE {path}")

    def error(self, response: httpx.Response, what: str) -> RegistryError:
        """A :class:`RegistryError` for an answer nothing more specific fits."""
        codes = error_codes(response)
        messages = _error_messages(response)
        detail = f": {'; '.join(messages)}" if messages else ""
        return RegistryError(
            f"{self.where} answered HTTP {response.status_code} to {what}{detail}",
            status=response.status_code,
            codes=codes,
        )


def error_list(response: httpx.Response) -> list[dict[str, Any]]:
    """The ``errors`` of a distribution-spec error answer (objects with ``code``, ``message``, ``detail``)."""
    try:
        body = json.loads(body_of(response) or b"null")
    except ValueError:
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def error_codes(response: httpx.Response) -> tuple[str, ...]:
    """The distribution-spec error codes of an answer (``("BLOB_UNKNOWN",)``)."""
    return tuple(str(e["code"]) for e in error_list(response) if isinstance(e.get("code"), str))


def _error_messages(response: httpx.Response) -> list[str]:
    out = []
    for error in error_list(response):
        text = f"{error.get('code', '?')}: {error.get('message', '')}"
        detail = error.get("detail")
        if detail not in (None, {}, "", []):
            text += f" ({json.dumps(detail)[:200]})"
        out.append(text)
    return out
