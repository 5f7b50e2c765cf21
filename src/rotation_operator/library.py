"""What applications import: encrypt and decrypt with the keys the operator manages.

    from rotation_operator.library import Encryptor
    enc = Encryptor(dsn, kek, schema="app")   # the same KEK the operator reads (bytes, or
                                              # a Kek: pkcs11kek.Pkcs11Kek for an HSM)
    value, key_id = enc.encrypt(b"api-token")  # store both columns together
    plaintext = enc.decrypt(value, key_id)     # key_id None: a legacy (KEK) row

The ring is loaded from the keys table once and cached (DEKs unwrapped once).  It is safe
while a rotation runs: every ``max_age`` seconds ``encrypt`` checks, with one tiny query,
whether the active key changed (so new writes move to the new DEK within ``max_age`` and
the rotation's next pass picks up the few written before), and ``decrypt`` reloads the
ring when it meets a key id it does not know.  Thread-safe.

The keys table is read from one schema, pinned for the encryptor's life: ``schema`` when
given (do give it), else the one schema of the search path that holds a table of that name
when the ring is first loaded.  A second one there (a table of the same name that another
role created earlier in the search path, e.g. in the ``"$user"`` schema) is refused with
:class:`~rotation_operator.errors.KeysTableAmbiguous`, and one created later is never read:
no search path can make the library use another keys table.

Legacy rows (``key_id`` None) are read only until the first rotation has migrated every one
of them onto a DEK: from then on the ring refuses them with
:class:`~rotation_operator.errors.LegacyReadsClosed` (a subclass of ``UnknownKeyError``),
unless the policy keeps legacy reads open (``spec.legacy.reads: Open``).  The library reads
that from the keys table's meta row when it loads the ring, and again, at most every
``max_age`` seconds, when it meets a legacy row (``docs/format.md`` §8).

Every value that fails to decrypt counts in the Prometheus counter
``rotation_operator_library_decrypt_failures_total{keys_table}`` of the default registry:
an application that exports its metrics feeds the ``RotationOperatorLibraryDecryptFailures``
alert without code of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import Counter

from rotation_operator.crypto.kek import Kek, as_kek
from rotation_operator.crypto.keyring import KeyRing
from rotation_operator.errors import (
    DatabaseUnavailable,
    InvalidToken,
    KeysTableAmbiguous,
    UnknownKeyError,
)
from rotation_operator.policy.config import KEYS_TABLE, identifier
from rotation_operator.store import keys, schema
from rotation_operator.store.database import Conn, connect, db_errors
from rotation_operator.store.keystore import KeyStore
from rotation_operator.store.names import Tables

T = TypeVar("T")
DECRYPT_FAILURES = Counter("rotation_operator_library_decrypt_failures_total",
                           "Values this application could not decrypt", ("keys_table",))


class Encryptor:
    """A cached key ring bound to one keys table."""

    def __init__(self, dsn: str, kek: bytes | Kek, *, keys_table: str = "encryption_keys",
                 schema: str | None = None, max_age: float = 1.0,
                 previous: Sequence[bytes | Kek] = ()):
        identifier(keys_table, "keys table", KEYS_TABLE)
        self._tables = Tables(keys_table, schema)
        #: The name users gave (metrics label): the schema may be pinned only later.
        self._label = self._tables.qualified_keys
        self._store = KeyStore(self._tables)
        self._dsn = dsn
        # During a rekey the DEKs flip from the previous KEK to the current one in one
        # transaction: a ring given both reads them before and after.
        self._kek = [as_kek(kek), *(as_kek(p) for p in previous)]
        self.max_age = max_age
        self._lock = threading.Lock()
        self._conn: Conn | None = None
        self._ring: KeyRing | None = None
        self._checked = 0.0
        self._legacy_checked = 0.0

    def __repr__(self) -> str:
        return f"Encryptor(keys={self._tables.qualified_keys!r})"

    @property
    def schema(self) -> str | None:
        """The keys table's schema: the one given, or the one pinned at the first load."""
        return self._tables.schema

    def encrypt(self, plaintext: bytes) -> tuple[bytes, int]:
        """Encrypt under the active DEK; store ``(value, key_id)`` in the same row."""
        return self._current().encrypt(plaintext)

    def decrypt(self, value: bytes, key_id: int | None) -> bytes:
        """Decrypt a stored value (``key_id`` ``None`` = legacy row under the KEK; refused
        with :class:`~rotation_operator.errors.LegacyReadsClosed` once every legacy row
        was migrated, unless the policy keeps legacy reads open)."""
        ring = self._ring or self.refresh()
        if key_id is None and not ring.legacy_closed and \
                time.monotonic() - self._legacy_checked >= self.max_age:
            ring = self._legacy_ring(ring)
        try:
            try:
                return ring.decrypt(value, key_id)
            except UnknownKeyError:
                return self.refresh().decrypt(value, key_id)
        except (InvalidToken, UnknownKeyError):
            DECRYPT_FAILURES.labels(self._label).inc()
            raise

    def refresh(self) -> KeyRing:
        """Reload the whole ring from the database (fail closed on a wrong KEK)."""
        with self._lock:
            try:
                with db_errors():
                    ring = self._load(self._connection())
            except DatabaseUnavailable:  # dropped while idle: once more, on a new session
                self._reset()
                with db_errors():
                    ring = self._load(self._connection())
            self._ring, self._checked = ring, time.monotonic()
            self._legacy_checked = self._checked
            return ring

    def _legacy_ring(self, ring: KeyRing) -> KeyRing:
        """The ring to read a legacy row with: reloaded when the legacy record closed
        legacy reads since this ring was loaded (a rotation finished migrating)."""
        with self._lock:
            asked = time.monotonic()
            closed = self._query(lambda conn: self._store.legacy_state(conn).closed)
            self._legacy_checked = asked
        return self.refresh() if closed else ring

    @property
    def ring(self) -> KeyRing:
        return self._ring or self.refresh()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Encryptor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _load(self, conn: Conn) -> KeyRing:
        if self._tables.schema is None:
            self._pin(conn)
        return self._store.load_ring(conn, self._kek)

    def _pin(self, conn: Conn) -> None:
        """Resolve the keys table's schema through the search path once, and keep it."""
        found = schema.search_path_schemas(conn, self._tables)
        if len(found) > 1:
            raise KeysTableAmbiguous(
                f"keys table {self._tables.keys_table} is found in schemas "
                f"{', '.join(found)} of the search path: one may shadow the other, so none is "
                "read; pass schema= naming the operator's keys schema")
        if found:  # none: the load names the missing table
            self._tables = Tables(self._tables.keys_table, found[0])
            self._store = KeyStore(self._tables)

    def _current(self) -> KeyRing:
        ring = self._ring
        if ring is None:
            return self.refresh()
        if time.monotonic() - self._checked < self.max_age:
            return ring
        with self._lock:
            asked = time.monotonic()  # the answer is at least as fresh as the question
            active = self._query(lambda conn: keys.active_version(conn, self._tables))
            self._checked = asked
        if active is not None and active != ring.active_version:
            return self.refresh()
        return ring

    def _query(self, query: Callable[[Conn], T]) -> T | None:
        """``query`` on the connection; a connection dropped while idle
        (idle_session_timeout, a proxy, a restarted server) is reopened once before giving
        up."""
        for attempt in (1, 2):
            try:
                with db_errors():
                    return query(self._connection())
            except DatabaseUnavailable:
                if attempt == 2:
                    raise
                self._reset()
        return None

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self._dsn, application_name="rotation-operator-library")
        return self._conn
