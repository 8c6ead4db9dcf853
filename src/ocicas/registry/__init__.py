"""The registry engine: the :class:`~ocicas.Engine` protocol over an OCI distribution registry.

Open a repository with :func:`open_registry`; see :mod:`ocicas.registry._engine`
for how the protocol maps onto the distribution API and what a registry cannot do.
It needs httpx: ``pip install 'ocicas[registry]'``.
"""

from . import _requires  # noqa: F401  first: without httpx, a one-line error saying how to install it
from ._auth import Credentials, docker_config_path
from ._engine import RegistryEngine
from ._location import RegistryLocation, parse_registry_location
from ._open import open_registry
from ._transport import RetryPolicy

__all__ = [
    "Credentials",
    "RegistryEngine",
    "RegistryLocation",
    "RetryPolicy",
    "docker_config_path",
    "open_registry",
    "parse_registry_location",
]
