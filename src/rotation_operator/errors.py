"""The errors every layer raises, in one place.

Callers need to tell three things apart: *retry later* (database down, another rotator holds
the lock), *a human must fix something* (a bad spec, a wrong KEK, a row that does not
decrypt), and *a bug*.  Each error carries a stable ``reason`` (CamelCase, used verbatim as a
Kubernetes condition reason and in CLI output) and ``retryable``.  The operator maps them to
``kopf.TemporaryError`` / ``kopf.PermanentError`` at exactly one boundary.

One cause, one reason, whichever part of a rotation notices it first: a database that
restarted, crashed, failed over or cannot be reached is :class:`DatabaseUnavailable`, seen
by a batch, a parallel worker or the rotation lock's heartbeat alike.  :class:`LockLost`
means only the lock's own session ended while the database stayed up (terminated, an idle
timer, a proxy), and :class:`Superseded` that another rotator took the rotation over.

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


class LegacyNeedsRawKek(KekError):
    """Legacy rows exist but the KEK cannot be read (it lives in an HSM)."""

    reason = "LegacyRowsNeedRawKEK"


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
    """PostgreSQL cannot be reached, dropped the connection, or restarted (also when the
    rotation lock's session is the one that noticed)."""

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


class LegacyReadsClosed(UnknownKeyError):
    """A legacy row (key id NULL) met after every legacy row was migrated onto a DEK, while
    legacy reads are closed: a rollback (an old ciphertext put back) or an application
    still writing without DEKs.  Refused, never decrypted or moved (``docs/format.md`` §8)."""

    reason = "LegacyReadsClosed"


class AuditChainError(RotationOperatorError):
    """The audit log's hash chain is broken: a row was altered, removed or inserted."""

    reason = "AuditChainBroken"


class KeysetTampered(RotationOperatorError):
    """The keys table was tampered with, in a way a KEK holder can detect: a wrapped DEK
    that does not unwrap under the KEK its fingerprint names (the bytes were altered or
    swapped), or a keys-table row or meta row whose MAC does not verify.  Any keys-table
    tampering a KEK holder can detect is this error, never a wrong KEK or bad input.

    Fails closed everywhere (operator, CLI, library), naming the key version or row:
    nothing is read or written under a keyset known to be altered.  Restoring the keys
    table from a backup heals it, so the operator retries (slowly)."""

    reason = "KeysetTampered"
    retryable = True
    retry_delay = 300.0

    def __init__(self, message: str, *, key_version: int | None = None):
        super().__init__(message)
        #: The DEK version whose row was found altered, when one row is to blame.
        self.key_version = key_version


class NotInitialised(SchemaError):
    """The keys table does not exist yet (nothing was initialised in this database)."""

    reason = "NotInitialised"


class KeysTableAmbiguous(ConfigError):
    """No schema was given and the keys table's name is found in more than one schema of
    the search path: another table could shadow the real one, so nothing is read."""

    reason = "KeysTableAmbiguous"


class TargetUnsupported(SchemaError):
    """A target is of a kind the engine refuses (a view, a foreign table, an UPDATE rule,
    row-level security that hides rows from the operator's role)."""

    reason = "TargetUnsupported"


class RowSecurityError(TargetUnsupported):
    """Row-level security on a target would hide rows from the rotation."""

    reason = "RowLevelSecurity"


class KeysTableShared(ConfigError):
    """The keys table already serves other targets (another application's policy)."""

    reason = "KeysTableShared"
    retryable = True  # fixing either policy heals it
    retry_delay = 60.0


class ForeignKeyIds(ConfigError):
    """The targets' rows carry key ids of another keys table."""

    reason = "KeysTableMismatch"
    retryable = True
    retry_delay = 60.0


class KeyStateError(ConfigError):
    """A key lifecycle step does not fit the key's state (or the key does not exist)."""

    reason = "KeyStateInvalid"


class KeyInUse(RotationOperatorError):
    """A key lifecycle step is refused: rows still reference the key."""

    reason = "KeyInUse"
    retryable = True
    retry_delay = 300.0


class RowsUnderUnusableKey(RotationOperatorError):
    """A row names a disabled or destroyed key (e.g. restored from an earlier backup): no
    ring can read it, so no rotation can move it.  Refused before anything is minted."""

    reason = "RowsUnderUnusableKey"
    retryable = True  # deleting or rewriting the row, or enabling the key, heals it
    retry_delay = 120.0


class NotLeading(RotationOperatorError):
    """This replica lost the leader Lease: it writes nothing to the cluster any more (it
    exits and comes back as a standby)."""

    reason = "NotLeading"
    retryable = True
    retry_delay = 5.0


class ServerUnsupported(ConfigError):
    """The PostgreSQL server is too old (TID range scans need 14 or later)."""

    reason = "DatabaseVersionUnsupported"


# -- the rotation stopped before it finished ------------------------------------------------
class RotationStopped(RotationOperatorError):
    """A rotation stopped cleanly between batches; it resumes on the next attempt."""

    reason = "RotationStopped"
    retryable = True
    retry_delay = 5.0


class RotationPaused(RotationStopped):
    """``spec.rotation.paused`` is set: stopped between batches, resumed when cleared."""

    reason = "Paused"
    retryable = False


class RotationCancelled(RotationStopped):
    """The policy was deleted while its rotation ran: stopped between batches."""

    reason = "Cancelled"
    retryable = False


class Superseded(RotationStopped):
    """Fenced: another rotator took this rotation over, or its key is no longer active."""

    reason = "RotationSuperseded"


class LockLost(RotationStopped):
    """The session holding the rotation lock died while the database stayed up (idle
    timeout, network drop, ``pg_terminate_backend``): stopped before another rotator could
    interleave.  A database restart is :class:`DatabaseUnavailable`, not this."""

    reason = "LockLost"


class RotationStuck(RotationOperatorError):
    """A pass moved nothing while rows remain (a trigger suppressing the UPDATE, rows the
    role cannot update): stopped instead of looping."""

    reason = "RotationStuck"
    retryable = True  # once the trigger or grant is fixed it goes on
    retry_delay = 120.0


class TriggerInterference(RotationOperatorError):
    """A row trigger changed what the rotation wrote: the batch was rolled back."""

    reason = "TriggerChangedRow"
    retryable = True
    retry_delay = 120.0


# -- failures outside the package, translated at one place ----------------------------------
class DatabaseError(RotationOperatorError):
    """PostgreSQL refused a statement; the message is sanitized (no DETAIL, no values)."""

    reason = "DatabaseError"
    retryable = True
    retry_delay = 30.0


class DatabaseForbidden(DatabaseError):
    """The operator's database role lacks a privilege (the message names it)."""

    reason = "DatabasePermissionDenied"
    retry_delay = 60.0


class LockTimeout(DatabaseError):
    """A lock was not granted within ``lock_timeout`` (a long transaction holds it)."""

    reason = "LockTimeout"
    retry_delay = 10.0


class StatementTimeout(DatabaseError):
    """A statement ran longer than ``statement_timeout``."""

    reason = "StatementTimeout"


class DatabaseRejected(DatabaseError):
    """A constraint or a trigger on the target rejected the rotation's write."""

    reason = "DatabaseRejected"
    retry_delay = 60.0


class KubernetesUnavailable(RotationOperatorError):
    """The Kubernetes API did not answer (timeout, connection refused, HTTP 5xx)."""

    reason = "KubernetesUnavailable"
    retryable = True
    retry_delay = 10.0


class InternalError(RotationOperatorError):
    """A bug: an exception nobody expected.  Only its type is reported."""

    reason = "InternalError"
    retryable = True
    retry_delay = 60.0
