"""The ocicas exception tree.

Every error ocicas raises on purpose derives from :class:`OCICASError`, and each
also derives from the builtin exception a Python user would naturally catch::

    OCICASError
    ├── InvalidError (ValueError)              ErrInvalid: bad input or an invalid image
    │   ├── DigestMismatchError                content does not hash to its digest
    │   ├── SizeMismatchError                  content is not the size it claims
    │   └── BlobTooLargeError                  a whole-blob read would exceed its cap
    ├── NotFoundError (FileNotFoundError)
    │   ├── BlobNotFoundError
    │   ├── ReferenceNotFoundError
    │   └── LayoutNotFoundError
    ├── ClobberError (FileExistsError)         ErrClobber: would overwrite something else
    │   └── LayoutExistsError
    ├── UnsupportedError (NotImplementedError) ErrNotImplemented
    │   └── UnsupportedAlgorithmError          a digest algorithm we cannot compute
    ├── EngineClosedError (ValueError)         the engine was closed
    ├── NotDurableError (OSError)              applied and visible, but a sync failed: may not survive a crash
    ├── ContextError                           a Context ended the operation
    │   ├── ContextCancelledError              ``ctx.cancel()`` was called
    │   └── DeadlineExceededError (TimeoutError)
    └── RegistryError                          a registry failed a request (status and error codes)
        ├── AccessDeniedError (PermissionError)        credentials refused, or no access
        └── RegistryUnreachableError (ConnectionError) refused, reset, TLS failure, timeout

Operating-system failures (a full disk, a permission error) propagate as the
``OSError`` the system raised: they are not ocicas's verdict on the data.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "BlobNotFoundError",
    "BlobTooLargeError",
    "ClobberError",
    "ContextCancelledError",
    "ContextError",
    "DeadlineExceededError",
    "DigestMismatchError",
    "EngineClosedError",
    "InvalidError",
    "LayoutExistsError",
    "LayoutNotFoundError",
    "NotDurableError",
    "NotFoundError",
    "OCICASError",
    "ReferenceNotFoundError",
    "RegistryError",
    "RegistryUnreachableError",
    "SizeMismatchError",
    "UnsupportedAlgorithmError",
    "UnsupportedError",
]


class OCICASError(Exception):
    """Base class of every error ocicas raises on purpose."""

    def __str__(self) -> str:
        # OSError subclasses format (errno, strerror) pairs; we always pass one message.
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidError(OCICASError, ValueError):
    """Invalid input or an invalid image was detected (Go's ``ErrInvalid``)."""


class DigestMismatchError(InvalidError):
    """Content did not hash to the digest it was stored or requested under."""


class SizeMismatchError(InvalidError):
    """Content was not the size its descriptor or caller said it is."""


class BlobTooLargeError(InvalidError):
    """A whole-blob read was refused because the blob exceeds the size cap."""


class NotFoundError(OCICASError, FileNotFoundError):
    """Something that was asked for does not exist (Go's ``os.ErrNotExist``)."""


class BlobNotFoundError(NotFoundError):
    """No blob is stored under the digest."""


class ReferenceNotFoundError(NotFoundError):
    """No reference is stored under the name."""


class LayoutNotFoundError(NotFoundError):
    """The path given to ``open_layout`` does not exist."""


class ClobberError(OCICASError, FileExistsError):
    """The operation would overwrite an existing, different object (Go's ``ErrClobber``)."""


class LayoutExistsError(ClobberError):
    """``create_layout`` was given a path that already exists."""


class UnsupportedError(OCICASError, NotImplementedError):
    """The engine cannot perform this operation (Go's ``ErrNotImplemented``)."""


class UnsupportedAlgorithmError(UnsupportedError):
    """The digest is well-formed, but its algorithm cannot be computed here."""


class EngineClosedError(OCICASError, ValueError):
    """The engine was used after ``close()``."""


class NotDurableError(OCICASError, OSError):
    """A change was applied and is visible, but syncing it to disk failed: it may not survive a crash.

    Raised instead of the system's ``OSError`` (its :attr:`errno` and ``__cause__``)
    where a failure came after the change became visible (a directory fsync after
    the rename), so "failed" would be untrue: readers already see the change.
    """


class ContextError(OCICASError):
    """An operation was ended by its :class:`~ocicas.Context`."""


class ContextCancelledError(ContextError):
    """The operation's context was cancelled."""


class DeadlineExceededError(ContextError, TimeoutError):
    """The operation's context reached its deadline."""


class RegistryError(OCICASError):
    """A registry failed a request and ocicas has no more specific error for it.

    :attr:`status` is the HTTP status (``None`` if no answer came) and :attr:`codes`
    the distribution-spec error codes of the answer (``("MANIFEST_INVALID",)``);
    :attr:`retry_after` the seconds its ``Retry-After`` asked to wait, if it did.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        codes: tuple[str, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.codes = codes
        self.retry_after = retry_after


class AccessDeniedError(RegistryError, PermissionError):
    """A registry refused the credentials, or they do not grant the access needed."""


class RegistryUnreachableError(RegistryError, ConnectionError):
    """A registry could not be reached: connection refused or dropped, TLS failure, timeout."""
