"""What the ``rotation-operator`` command's exit status says, and which error gives which.

0 success; 1 the operation failed (a row did not decrypt, verify found problems); 2 bad
input (flags, spec, KEK format, wrong KEK); 3 try again later (database unreachable,
another rotation holds the lock, verify during a running rotation); 4 the keys table was
tampered with (:class:`KeysetTampered`: any alteration a KEK holder can detect); 130
interrupted.  Pipelines branch on these numbers: they never change.
"""

from __future__ import annotations

import logging
from enum import IntEnum

from rotation_operator.errors import (
    AuditChainError,
    ConfigError,
    DatabaseForbidden,
    InternalError,
    KekError,
    KeyInUse,
    KeysetTampered,
    RotationCancelled,
    RotationOperatorError,
    RotationPaused,
    RotationStuck,
    RowDecryptError,
    TriggerInterference,
    UnknownKeyError,
)

log = logging.getLogger("rotation_operator.cli")


class ExitStatus(IntEnum):
    """The command's exit statuses."""

    OK = 0
    #: The operation failed on the data: a human must look at rows.
    FAILED = 1
    #: Bad input or setup: flags, a spec, the KEK's format, a wrong KEK.
    USAGE = 2
    #: Try again later: the database is unreachable, another rotation holds the lock.
    RETRY = 3
    #: The keys table was tampered with (:class:`KeysetTampered`): restore it from backup.
    TAMPERED = 4
    #: Stopped by Ctrl-C (128 + SIGINT).
    INTERRUPTED = 130


#: Problems with the data itself: a human must look at rows.
_DATA_ERRORS = (RowDecryptError, UnknownKeyError, AuditChainError, RotationStuck,
                TriggerInterference, KeyInUse)


def exit_status(exc: RotationOperatorError) -> ExitStatus:
    """1 failed (data), 2 bad input or setup, 3 try again later, 4 tampered."""
    if isinstance(exc, KeysetTampered):
        return ExitStatus.TAMPERED
    if isinstance(exc, _DATA_ERRORS):
        return ExitStatus.FAILED
    if isinstance(exc, ConfigError | KekError | DatabaseForbidden):
        return ExitStatus.USAGE
    if isinstance(exc, RotationPaused | RotationCancelled):
        return ExitStatus.RETRY
    return ExitStatus.RETRY if exc.retryable else ExitStatus.FAILED


def as_package_error(exc: BaseException) -> RotationOperatorError:
    """Any exception as the package's error, sanitized (psycopg's DETAIL never shows)."""
    if isinstance(exc, RotationOperatorError):
        return exc
    import psycopg

    from rotation_operator.store.database import translate
    if isinstance(exc, psycopg.Error):
        return translate(exc)
    log.debug("unexpected error", exc_info=exc)
    return InternalError(f"unexpected {type(exc).__name__} (a bug; rerun with -v for the "
                         "traceback in the log)")
