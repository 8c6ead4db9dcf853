"""Real ``docker-registry`` processes (distribution 2.8) on loopback, for the registry engine tests.

:func:`start_registry` writes a config (filesystem storage in a temporary
directory, deletes enabled, log level error, ``127.0.0.1`` on a free port;
optionally htpasswd basic auth and TLS from a test CA), starts the registry and
waits until ``/v2/`` answers. :meth:`Registry.stop` ends it. Everything is
synchronous: the tests start one registry per module from a module-scoped fixture.
"""

from __future__ import annotations

import dataclasses
import http.client
import secrets
import socket
import ssl
import subprocess
import time
from pathlib import Path

import bcrypt
import httpx
import trustme

#: Seconds a registry may take to answer ``/v2/`` after it was started.
_START_TIMEOUT = 15.0


@dataclasses.dataclass
class Registry:
    """A running ``docker-registry``."""

    #: ``http://127.0.0.1:PORT`` (``https://`` with TLS).
    url: str
    process: subprocess.Popen[bytes]
    directory: Path
    #: The CA that signed the server certificate (TLS registries), as a PEM file.
    ca_file: Path | None = None
    #: The one user of an htpasswd registry.
    username: str | None = None
    password: str | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return self.url.partition("://")[2]

    def repository(self, prefix: str = "test") -> str:
        """A repository name no other test uses."""
        return f"{prefix}/r{secrets.token_hex(6)}"

    def location(self, repository: str) -> str:
        """The location of ``repository`` on this registry, as ``open_registry`` takes it."""
        return f"{self.url}/{repository}"

    def log(self) -> str:
        """What the registry wrote to stdout and stderr so far."""
        return (self.directory / "registry.log").read_text(errors="replace")

    def stop(self) -> None:
        """Terminate the registry (kill it if it does not stop within 5 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(directory: Path, port: int, auth: Path | None, tls: tuple[Path, Path] | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {directory / 'data'}",
        "  delete:",
        "    enabled: true",
        "  maintenance:",
        "    uploadpurging:",
        "      enabled: false",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        f"  secret: {secrets.token_hex(16)}",
    ]
    if tls is not None:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if auth is not None:
        lines += ["auth:", "  htpasswd:", "    realm: ocicas-test", f"    path: {auth}"]
    return "\n".join(lines) + "\n"


def _answers(url: str, context: ssl.SSLContext | None) -> bool:
    """Whether ``GET /v2/`` gets any HTTP answer (401 included: the registry is up)."""
    host, _, port = url.partition("://")[2].partition(":")
    connection = (
        http.client.HTTPSConnection(host, int(port), timeout=1, context=context)
        if context is not None
        else http.client.HTTPConnection(host, int(port), timeout=1)
    )
    try:
        connection.request("GET", "/v2/")
        return connection.getresponse().status in (200, 401)
    except OSError:
        return False
    finally:
        connection.close()


def start_registry(
    binary: str,
    directory: Path,
    *,
    credentials: tuple[str, str] | None = None,
    ca: trustme.CA | None = None,
) -> Registry:
    """Start a registry in ``directory``: plain, with htpasswd ``credentials``, or with TLS signed by ``ca``."""
    auth = tls = None
    if credentials is not None:
        auth = directory / "htpasswd"
        # cost 4, the lowest bcrypt allows: the registry checks it on every request
        entry = bcrypt.hashpw(credentials[1].encode(), bcrypt.gensalt(rounds=4)).decode()
        auth.write_text(f"{credentials[0]}:{entry}\n")
    context = None
    ca_file = None
    if ca is not None:
        certificate = ca.issue_cert("127.0.0.1")
        tls = (directory / "server.pem", directory / "server.key")
        certificate.private_key_pem.write_to_path(str(tls[1]))
        with tls[0].open("wb") as f:
            for blob in certificate.cert_chain_pems:
                f.write(blob.bytes())
        ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        context = ssl.create_default_context(cafile=str(ca_file))
    scheme = "https" if ca is not None else "http"
    for _attempt in range(3):  # the port can be taken between free_port() and the registry's bind
        port = free_port()
        config = directory / "config.yml"
        config.write_text(_config(directory, port, auth, tls))
        with (directory / "registry.log").open("wb") as log:
            process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        registry = Registry(f"{scheme}://127.0.0.1:{port}", process, directory, ca_file)
        if credentials is not None:
            registry.username, registry.password = credentials
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(registry.url, context):
                return registry
            time.sleep(0.05)
        registry.stop()
    raise RuntimeError(f"docker-registry did not start:\n{registry.log()}")


class Recorder(httpx.AsyncBaseTransport):
    """An httpx transport that records every request it passes on."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    def take(self) -> list[tuple[str, str]]:
        """``(method, path)`` of the requests recorded since the last ``take``."""
        requests, self.requests = self.requests, []
        return [(request.method, request.url.path) for request in requests]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()
