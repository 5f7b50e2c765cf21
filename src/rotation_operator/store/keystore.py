"""The keys of one keys table as the engine, the lifecycle and the library use them.

Why a facade: DEKs are wrapped and unwrapped with KEKs here, and only here (minting a key,
loading a ring, rewrapping under a new KEK, proving a KEK against legacy rows); everything
else is one call into the module that owns the table it touches:

* :mod:`.schema`: creating and migrating the operator's own tables;
* :mod:`.keys`: the keys table (DEK rows, states);
* :mod:`.rotations`: rotation records and their fences;
* :mod:`.coverage`: which targets the keys table covers (the meta table);
* :mod:`.targets`: counts and checks over the target tables;
* :mod:`.advisory`: the advisory-lock keys of a keys table.

This module holds no SQL.  Functions run in the caller's transaction unless they say
otherwise, so the engine decides what commits together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from rotation_operator.crypto import codec
from rotation_operator.crypto import kek as kek_mod
from rotation_operator.crypto.kek import Kek
from rotation_operator.crypto.keyring import KeyRing, legacy_cipher
from rotation_operator.errors import (
    InvalidToken,
    KekMismatchError,
    KeysetTampered,
    LegacyNeedsRawKek,
    RotationOperatorError,
)
from rotation_operator.policy.config import StoreConfig
from rotation_operator.store import (
    advisory,
    audit,
    coverage,
    keys,
    legacy,
    rotations,
    schema,
    targets,
)
from rotation_operator.store.advisory import lock_id
from rotation_operator.store.catalog import Heap, Layout
from rotation_operator.store.coverage import Coverage
from rotation_operator.store.database import Conn
from rotation_operator.store.keys import READABLE, KeyRecord
from rotation_operator.store.legacy import LegacyState, Reads
from rotation_operator.store.names import Tables
from rotation_operator.store.rotations import RotationRecord
from rotation_operator.store.schema import SCHEMA_VERSION
from rotation_operator.store.targets import (
    Scope,
    check_no_key_ids,
    has_legacy_rows,
    stale_condition,
)

__all__ = ["LEGACY_SAMPLE", "READABLE", "SCHEMA_VERSION", "Coverage", "KeyRecord", "KeyStore",
           "LegacyState", "RotationRecord", "check_legacy_kek", "check_no_key_ids",
           "has_legacy_rows", "legacy_kek", "lock_id", "raise_legacy_needs_raw",
           "stale_condition", "wrapping_kek"]

#: Rows sampled per target to prove the KEK before key v1 binds the keys table to it.
LEGACY_SAMPLE = 20


class KeyStore:
    """The tables of one keys table: keys, rotations, meta, audit.

    ``cfg``: a policy's store config, or only the keys table's names (the library's
    :class:`~.names.Tables`); nothing here reads the targets of ``cfg``.
    """

    def __init__(self, cfg: StoreConfig | Tables):
        self.cfg = cfg
        self.tables = Tables.of(cfg)

    # -- naming and locks ----------------------------------------------------------------
    def resolved_name(self, conn: Conn) -> str:
        return advisory.resolved_name(conn, self.tables)

    def lock_key(self, conn: Conn, purpose: str) -> int:
        return advisory.lock_key(conn, self.tables, purpose)

    # -- schema --------------------------------------------------------------------------
    def exists(self, conn: Conn) -> bool:
        return schema.exists(conn, self.tables)

    def schema_version(self, conn: Conn) -> int | None:
        return schema.schema_version(conn, self.tables)

    def migrate(self, conn: Conn) -> None:
        schema.migrate(conn, self.tables)

    # -- coverage: which targets this keys table serves ----------------------------------
    def coverage(self, conn: Conn) -> Coverage | None:
        return coverage.coverage(conn, self.tables)

    def check_coverage(self, conn: Conn, layouts: Sequence[Layout], owner: str | None
                       ) -> Coverage | None:
        return coverage.check_coverage(conn, self.tables, layouts, owner)

    def record_coverage(self, conn: Conn, layouts: Sequence[Layout], owner: str | None,
                        actor: str) -> None:
        coverage.record_coverage(conn, self.tables, layouts, owner, actor)

    # -- keys ----------------------------------------------------------------------------
    def list_keys(self, conn: Conn) -> list[KeyRecord]:
        return keys.list_keys(conn, self.tables)

    def insert_key(self, conn: Conn, kek: Kek, *, version: int, actor: str,
                   policy_version: int | None, writes: int | None = None) -> None:
        """Mint a DEK, wrap it, store it as the active key (caller retires the old one);
        ``writes``: the targets' write statistics now, the base of its usage estimate."""
        wrapped = kek.wrap(codec.new_key(), version)
        keys.insert(conn, self.tables, version=version, wrapped=wrapped,
                    fingerprint=kek.fingerprint, actor=actor, policy_version=policy_version,
                    writes=writes)

    def mark_active_retiring(self, conn: Conn) -> list[int]:
        return keys.mark_active_retiring(conn, self.tables)

    def retire_retiring(self, conn: Conn, actor: str) -> list[int]:
        return keys.retire_retiring(conn, self.tables, actor)

    def ensure_active_key(self, conn: Conn, kek: Kek, actor: str,
                          policy_version: int | None, layouts: Sequence[Layout]) -> bool:
        """Create key v1 when the table has no key at all; True if it did.

        Serialised by a transaction-scoped advisory lock, so two initialisers make one key.
        """
        with conn.transaction():
            advisory.lock_xact(conn, self.tables, "init")
            total, active = keys.counts(conn, self.tables)
            if total == 0:
                check_no_key_ids(conn, layouts, self.cfg.qualified_keys)
                check_legacy_kek(conn, kek, layouts)
                self.insert_key(conn, kek, version=1, actor=actor, policy_version=policy_version,
                                writes=self.writes(conn, layouts))
                return True
            if active == 0:
                raise RotationOperatorError(
                    f"keys table {self.cfg.qualified_keys} has {total} keys but none is active; "
                    "it was edited by hand: restore it from backup")
            return False

    def load_ring(self, conn: Conn, keks: Sequence[Kek], *,
                  disabled: bool = False, vouched: Kek | None = None) -> KeyRing:
        """Unwrap every stored DEK with whichever presented KEK wrapped it (the current
        one, or a previous one during a rekey); fail closed with :class:`KekMismatchError`
        when no KEK presented wrapped a key, and :class:`KeysetTampered` when the KEK its
        fingerprint names does not unwrap it (the wrap was altered).

        Every key is checked, not only the active one: rows (and backups) may reference any.
        Messages name only the fingerprints of the KEKs presented, never a stored one (it
        would let a guessed, low-entropy KEK be checked offline).  The ring reads legacy
        rows with the raw bytes of the KEK that wraps the keys, when they can be read,
        until the legacy record says every legacy row was migrated and reads are closed
        (:mod:`.legacy`): then it refuses key id NULL.  ``vouched``: a KEK the caller
        vouches legacy rows are under (``sweep --legacy-kek``): read with its bytes, closed
        or not.
        """
        presented = list(keks)
        every = self.list_keys(conn)
        # Disabled keys stay out of rings (unless a rekey must rewrap them); destroyed
        # ones have nothing left to unwrap.
        readable = (*READABLE, "disabled") if disabled else READABLE
        keys = [k for k in every if k.state in readable]
        unavailable = {k.version: k.state for k in every if k.state not in readable}
        active = [k.version for k in keys if k.state == "active"]
        if not active:
            raise RotationOperatorError(
                f"keys table {self.cfg.qualified_keys} has no active key")
        deks: dict[int, bytes] = {}
        # The active key first, so the error names the key that matters most.
        for k in sorted(keys, key=lambda k: (k.state != "active", -k.version)):
            kek = kek_mod.find(presented, k.kek_fingerprint)
            if kek is None:
                which = "the KEK presented" if len(presented) == 1 else "none of the KEKs presented"
                raise KekMismatchError(
                    f"{which} (fingerprint {kek_mod.fingerprints(presented)}) is not the one "
                    f"that wrapped DEK v{k.version}")
            try:
                deks[k.version] = kek.unwrap(k.wrapped_dek, k.version)
            except InvalidToken:
                # The KEK named is here, so the wrap itself was altered (or swapped from
                # another row): tampering, whichever key it is, used or not.
                raise KeysetTampered(
                    f"wrapped DEK v{k.version} ({k.state}) of {self.cfg.qualified_keys} does "
                    f"not unwrap under the KEK its fingerprint names ({kek.fingerprint}): "
                    "the keys table was altered; restore it from a backup",
                    key_version=k.version) from None
        if vouched is not None:
            return KeyRing.of(active[0], deks, vouched, unavailable)
        return KeyRing.of(active[0], deks, legacy_kek(keys, presented), unavailable,
                          legacy_closed=self.legacy_state(conn).closed)

    # -- the legacy record ---------------------------------------------------------------
    def legacy_state(self, conn: Conn) -> LegacyState:
        return legacy.state(conn, self.tables)

    def set_legacy_reads(self, conn: Conn, reads: Reads, actor: str) -> bool:
        return legacy.set_reads(conn, self.tables, reads, actor)

    def mark_legacy_migrated(self, conn: Conn, actor: str, record_id: int) -> bool:
        return legacy.mark_migrated(conn, self.tables, actor, record_id)

    def rewrap(self, conn: Conn, ring: KeyRing, current: Kek, actor: str) -> list[int]:
        """Wrap every DEK not yet under ``current`` with it, in the caller's transaction;
        each new wrap is unwrapped and compared before it is written.  Returns the
        versions rewrapped (none when all are under ``current`` already: idempotent)."""
        done = []
        for k in self.list_keys(conn):
            if k.kek_fingerprint == current.fingerprint or k.state == "destroyed":
                continue
            dek = ring.deks[k.version]
            wrapped = current.wrap(dek, k.version)
            if current.unwrap(wrapped, k.version) != dek:
                raise KekMismatchError(f"the new KEK did not give back DEK v{k.version} "
                                       "after wrapping it; nothing was written")
            keys.set_wrap(conn, self.tables, k.version, wrapped, current.fingerprint,
                          k.kek_fingerprint)
            audit.append(conn, self.cfg, "key_rewrapped", key_version=k.version, actor=actor,
                         detail={"kek_fingerprint": current.fingerprint})
            done.append(k.version)
        return done

    # -- the end of a key's life --------------------------------------------------------
    def census(self, conn: Conn, rows: Mapping[int | None, int], now: datetime,
               writes: int | None = None, *, exact: bool = True) -> bool:
        return keys.census(conn, self.tables, rows, now, writes, exact=exact)

    def add_encryptions(self, conn: Conn, version: int, n: int) -> None:
        keys.add_encryptions(conn, self.tables, version, n)

    def writes(self, conn: Conn, layouts: Sequence[Layout]) -> int:
        return targets.writes(conn, layouts)

    def referenced(self, conn: Conn, layouts: Sequence[Layout], version: int
                   ) -> tuple[str, object] | None:
        """(target, an id) of a row under key ``version`` in any target, or None."""
        found = self.referenced_any(conn, layouts, [version])
        return None if found is None else found[:2]

    def referenced_any(self, conn: Conn, layouts: Sequence[Layout], versions: Sequence[int]
                       ) -> tuple[str, object, int] | None:
        return targets.referenced_any(conn, layouts, versions)

    def key_for_update(self, conn: Conn, version: int) -> KeyRecord:
        return keys.key_for_update(conn, self.tables, version)

    def disable(self, conn: Conn, version: int, now: datetime, destroy_after: datetime | None,
                actor: str) -> None:
        keys.disable(conn, self.tables, version, now, destroy_after, actor)

    def enable(self, conn: Conn, version: int, actor: str) -> None:
        keys.enable(conn, self.tables, version, actor)

    def destroy(self, conn: Conn, version: int, now: datetime, actor: str) -> None:
        keys.destroy(conn, self.tables, version, now, actor)

    # -- rotation records ----------------------------------------------------------------
    def rotation_records(self, conn: Conn) -> list[RotationRecord]:
        return rotations.rotation_records(conn, self.tables)

    def record(self, conn: Conn, record_id: int) -> RotationRecord:
        return rotations.record(conn, self.tables, record_id)

    def record_baseline(self, conn: Conn, policy_version: int, active_version: int,
                        actor: str) -> bool:
        return rotations.record_baseline(conn, self.tables, policy_version, active_version,
                                         actor)

    def claim_new(self, conn: Conn, *, kind: str, requested: int | None, mode: str,
                  from_version: int | None, to_version: int, actor: str, total: int
                  ) -> tuple[int, int]:
        return rotations.claim_new(conn, self.tables, kind=kind, requested=requested,
                                   mode=mode, from_version=from_version,
                                   to_version=to_version, actor=actor, total=total)

    def claim_resume(self, conn: Conn, record_id: int, mode: str) -> int:
        return rotations.claim_resume(conn, self.tables, record_id, mode)

    def adopt(self, conn: Conn, record_id: int, fence: int, policy_version: int,
              actor: str) -> None:
        rotations.adopt(conn, self.tables, record_id, fence, policy_version, actor)

    def announce(self, conn: Conn, record_id: int, fence: int) -> datetime:
        return rotations.announce(conn, self.tables, record_id, fence)

    def check_fence(self, conn: Conn, record_id: int, fence: int, key_version: int, *,
                    exclusive: bool = False) -> None:
        rotations.check_fence(conn, self.tables, record_id, fence, key_version,
                              exclusive=exclusive)

    def add_progress(self, conn: Conn, record_id: int, moved: int) -> None:
        rotations.add_progress(conn, self.tables, record_id, moved)

    def set_left(self, conn: Conn, record_id: int, left: int) -> None:
        rotations.set_left(conn, self.tables, record_id, left)

    def finish_record(self, conn: Conn, record_id: int, report: Mapping[str, Any]) -> None:
        rotations.finish_record(conn, self.tables, record_id, report)

    def add_report(self, conn: Conn, record_id: int, report: Mapping[str, Any]) -> None:
        rotations.add_report(conn, self.tables, record_id, report)

    # -- counts over targets -------------------------------------------------------------
    def key_counts(self, conn: Conn, layout: Layout) -> dict[int | None, int]:
        return targets.key_counts(conn, layout)

    def key_estimates(self, conn: Conn, layout: Layout, active: int | None,
                      exact_below: int) -> tuple[dict[int | None, int], bool]:
        """:func:`.targets.key_estimates`, statistics older than the last rotation or
        sweep taken as outdated."""
        return targets.key_estimates(conn, layout, active, exact_below,
                                     rotations.last_finished(conn, self.tables))

    def count_stale(self, conn: Conn, layouts: Iterable[Layout], active: int, *,
                    legacy: Scope = True) -> int:
        return targets.count_stale(conn, layouts, active, legacy=legacy)

    def example_stale(self, conn: Conn, layout: Layout, heap: Heap, active: int,
                      legacy: Scope) -> object:
        return targets.example_stale(conn, layout, heap, active, legacy)


def legacy_kek(keys: Sequence[KeyRecord], presented: Sequence[Kek]) -> Kek | None:
    """The KEK legacy rows are under: the one that wraps the keys (legacy rows are moved
    onto a DEK before a rekey changes that), if its bytes can be read."""
    wrapping = {k.kek_fingerprint for k in keys}
    for kek in presented:
        if kek.fingerprint in wrapping and kek.extractable:
            return kek
    return None


def wrapping_kek(keys: Sequence[KeyRecord], presented: Sequence[Kek]) -> Kek | None:
    """The presented KEK that wraps the active key (else any stored key), for messages."""
    ordered = sorted(keys, key=lambda k: (k.state != "active", -k.version))
    for k in ordered:
        found = kek_mod.find(presented, k.kek_fingerprint)
        if found is not None:
            return found
    return None


def check_legacy_kek(conn: Conn, kek: Kek, layouts: Sequence[Layout],
                     sample: int = LEGACY_SAMPLE) -> None:
    """Before key v1 binds the keys table to ``kek``, prove it is the KEK the legacy rows
    were encrypted with: one sampled row that decrypts is proof (a corrupt row among the
    sample is a bad row, reported when the rotation reaches it, not a wrong KEK); none
    that decrypts fails closed.

    Without this, a wrong KEK on a database of only legacy rows would mint v1 under the
    wrong key, and the right KEK would be refused from then on.
    """
    tried: list[str] = []
    cipher = legacy_cipher(kek)
    if cipher is None:
        if has_legacy_rows(conn, layouts):
            raise_legacy_needs_raw(kek)
        return
    for layout in layouts:
        t = layout.target
        for row_id, value in targets.legacy_sample(conn, layout, sample):
            try:
                codec.decrypt(cipher, value)
                return
            except InvalidToken:
                tried.append(f"{t.name}:{row_id}")
    if tried:
        shown = ", ".join(tried[:5]) + (", ..." if len(tried) > 5 else "")
        raise KekMismatchError(
            f"the KEK presented (fingerprint {kek.fingerprint}) decrypts none of "
            f"the {len(tried)} legacy rows sampled (legacy row {shown}); refusing to create "
            "DEK v1 under it")


def raise_legacy_needs_raw(kek: Kek) -> None:
    """Legacy rows must move and ``kek``, the KEK that wraps the keys (so the one they are
    under), cannot give its bytes: only a PKCS#11 key keeps them (a Secret, a file or a
    variable holds them in this process)."""
    why = ("keeps its bytes inside its token (a PKCS#11 key never lets them out)"
           if not kek.extractable else "was not presented as the KEK that wraps the keys")
    raise LegacyNeedsRawKek(
        f"legacy rows (key id NULL) are encrypted with the KEK itself, and {kek.describe()} "
        f"{why}: move them onto a DEK first with the KEK they are under in a Secret "
        "(spec.kek, or among spec.previousKeks while it rekeys; --previous-kek for the CLI), "
        "then use the HSM key")

