"""What a preparation and a rotation step yield, and the callbacks a caller gives them.

Shared by :mod:`.engine` (which prepares and decides) and :mod:`.run` (which acts), and
read by the CLI and the operator to report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rotation_operator.crypto.keyring import KeyRing
from rotation_operator.policy.decisions import (
    Decision,
    State,
)
from rotation_operator.store.catalog import Layout

ProgressFn = Callable[[int, int], None]


#: Raises (RotationPaused, RotationCancelled) to stop between batches; called often.
#: Returns the policy version the caller now asks for, if it knows one (a bump that arrives
#: during a scheduled rotation is served by it).
ControlFn = Callable[[], int | None]


@dataclass(frozen=True)
class Prepared:
    """What one preparation found: the targets, the key ring, the database's state."""

    layouts: tuple[Layout, ...]
    ring: KeyRing
    state: State
    created_key: bool = False
    baseline_recorded: bool = False


@dataclass(frozen=True)
class InitResult:
    active_version: int
    created_key: bool
    baseline_recorded: bool
    served_version: int | None


@dataclass(frozen=True)
class RotationResult:
    requested_version: int | None
    performed: bool  # False: nothing was done (see ``decision``)
    resumed: bool
    mode: str
    from_version: int | None
    to_version: int
    decision: Decision | None = None
    kind: str = "policy"
    re_encrypted: int = 0
    legacy_migrated: int = 0
    retired: tuple[int, ...] = ()
    seconds: float = 0.0
    #: What the handover did: grace waited, transactions waited for, timed out.
    handover: dict[str, Any] = field(default_factory=dict)
    #: Rows moved after the handover (written under an old key while the rotation ran).
    caught_in_handover: int = 0
    #: Rows found under a retired key right after the finish, and swept at once.
    swept_after: int = 0
    #: table -> (bytes before rotation, bytes after VACUUM); empty when vacuum is off.
    table_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Heaps VACUUM skipped because the role may not vacuum them (not the owner).
    vacuum_skipped: tuple[str, ...] = ()
    #: DEK versions rewrapped under the current KEK before anything else (a rekey).
    rekeyed: tuple[int, ...] = ()
