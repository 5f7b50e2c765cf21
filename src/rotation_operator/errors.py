"""The errors every layer raises, in one place.

Callers need to tell three things apart: *retry later* (database down, another rotator holds
the lock), *a human must fix something* (a bad spec, a wrong KEK, a row that does not
decrypt), and *a bug*.  Each error carries a stable ``reason`` (CamelCase, used verbatim as a
Kubernetes condition reason and in CLI output) and ``retryable``.  The operator maps them to
``kopf.TemporaryError`` / ``kopf.PermanentError`` at exactly one boundary.

No message built here ever contains key material or plaintext: messages name tables, row ids,
key versions, Secret names and lengths, never values.
"""

from __future__ import annotations


class RotationOperatorError(Exception):
    """Base of every error this package raises on purpose."""

    reason = "Error"
    retryable = False
    #: How long an automatic retry should wait, in seconds (operator only).
    retry_delay = 60.0


class InvalidToken(RotationOperatorError):
    """A value did not decrypt: wrong key, truncated, tampered or not our format.

    Deliberately opaque, as in ``cryptography.fernet.InvalidToken``: the cause is never
    said, so a failure leaks nothing about the key or the plaintext.
    """

    reason = "InvalidToken"

    def __init__(self, message: str = "value failed authentication or is not in a known format"):
        super().__init__(message)


class ConfigError(RotationOperatorError):
    """The request itself is wrong (spec, flags, identifiers): retrying cannot help."""

    reason = "InvalidSpec"


class KekError(RotationOperatorError):
    """The KEK cannot be used: missing, malformed or not the one that wrapped the DEKs."""

    reason = "KEKInvalid"
    retryable = True  # fixing the Secret must heal the policy without a spec change
    retry_delay = 60.0


class KekFormatError(KekError):
    """The KEK is not 32 raw bytes, 64 hex characters or base64 of 32 bytes."""

    reason = "KEKInvalid"


class KekMismatchError(KekError):
    """The KEK does not match the key that wrapped a stored DEK (fail closed)."""

    reason = "KEKMismatch"


class SecretError(RotationOperatorError):
    """A Kubernetes Secret named by the spec is missing or lacks the key."""

    reason = "SecretMissing"
    retryable = True
    retry_delay = 30.0


class AccessDenied(RotationOperatorError):
    """The operator's Kubernetes identity may not do something it needs (RBAC)."""

    reason = "Forbidden"
    retryable = True  # a fixed Role/RoleBinding heals it
    retry_delay = 60.0


class DatabaseUnavailable(RotationOperatorError):
    """PostgreSQL cannot be reached or dropped the connection."""

    reason = "DatabaseUnavailable"
    retryable = True
    retry_delay = 10.0


class SchemaError(ConfigError):
    """A target table or column does not exist or has an unsupported type."""

    reason = "TargetInvalid"
    retryable = True  # the application's migration may simply not have run yet
    retry_delay = 60.0


class LockHeld(RotationOperatorError):
    """Another rotator (operator replica or CLI) holds the rotation lock."""

    reason = "LockHeld"
    retryable = True
    retry_delay = 5.0


class RowDecryptError(RotationOperatorError):
    """A stored row did not decrypt: the rotation stops, its batch is not written."""

    reason = "RowDecryptFailed"
    retryable = True  # once the row is repaired the rotation can go on
    retry_delay = 120.0

    def __init__(self, table: str, row_id: object, key_version: int | None):
        self.table = table
        self.row_id = row_id
        self.key_version = key_version
        under = "the KEK (legacy row)" if key_version is None else f"DEK v{key_version}"
        super().__init__(
            f"row {row_id!r} of table {table} does not decrypt under {under}; "
            "nothing of its batch was written"
        )


class UnknownKeyError(RotationOperatorError):
    """A row names a key version that is not in the keys table."""

    reason = "UnknownKey"
    retry_delay = 120.0
    retryable = True


class AuditChainError(RotationOperatorError):
    """The audit log's hash chain is broken: a row was altered, removed or inserted."""

    reason = "AuditChainBroken"
