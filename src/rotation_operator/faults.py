"""Named fault points: the places a test may crash the process, or step in, mid-rotation.

Why in the product: "resumable after any crash" can only be proven by crashing at the
places that matter (after the new key is committed, between batches, inside an atomic
transaction, before the final commit), and a signal sent from outside cannot hit those
places reliably.  Likewise a race with the application (a write between a batch's SELECT
and its UPDATE, a writer blocked by Atomic's lock, a rotator that stalls after finishing)
can only be tested deterministically by acting at that exact place.  The code calls
:func:`point` there; tests never patch the rotation's internals instead.

Two ways to arm a point, both off in production (then :func:`point` costs two dict
lookups: the armed hooks and the environment):

* **crash** (any process, worker subprocesses included): the environment variable
  ``ROTATION_OPERATOR_FAULT`` set to ``<point>`` or ``<point>:<n>`` (the n-th time the point
  is reached, 1-based) makes the process SIGKILL itself there.
* **hook** (this process only): :func:`arm` registers a callable that runs each time the
  point is reached, in the thread reaching it; what it raises propagates from there.  Tests
  arm hooks through the ``fault_hook`` fixture, which disarms them after the test.

The points (:data:`POINTS`; arming any other name is an error, so a typo cannot make a test
pass without ever reaching its point):

``after-start``
    ``rotation.run``: the rotation or sweep is claimed and committed (a new key active),
    before its key is announced and any row moves.
``after-batch``
    ``rotation.mover``: after each batch (its transaction committed when the batch has one
    of its own), before the next.
``batch-read``
    ``rotation.mover``: a batch has read its rows (the SELECT is done) and has neither
    re-encrypted nor written them: the gap an application write or VACUUM may fall into.
    In Atomic mode this is inside the locked transaction.
``batch-before-commit``
    ``rotation.mover``: an Online batch is written and its progress added, before its
    transaction commits.
``before-finish``
    ``rotation.run``: every row moved, inside the transaction that retires the old keys
    and finishes the rotation, before it commits (Atomic: the locked transaction).
``after-finish``
    ``rotation.run``: a rotation has committed its finish, before it checks for rows
    that arrived under a retired key meanwhile (the post-finish sweep).
``before-vacuum``
    ``rotation.engine``: the rotation is done and its lock released, before the VACUUM of
    its targets.
``rekey-after-legacy``
    ``rotation.run``: a rekey has moved the legacy rows off the old KEK, before it
    re-wraps the DEKs.
``rekey-before-commit``
    ``rotation.run``: a rekey has re-wrapped every DEK, before its transaction commits.
``before-destroy``
    ``rotation.lifecycle``: a DEK destruction is checked (no row uses it), before it is
    destroyed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

ENV = "ROTATION_OPERATOR_FAULT"
POINTS = frozenset({
    "after-start", "after-batch", "batch-read", "batch-before-commit", "before-finish",
    "after-finish", "before-vacuum", "rekey-after-legacy", "rekey-before-commit",
    "before-destroy",
})
Hook = Callable[[], None]

_hits: dict[str, int] = {}
_hooks: dict[str, Hook] = {}


def point(name: str) -> None:
    """The code reached point ``name``: run its armed hook, if any; then SIGKILL this
    process if the fault spec in the environment names ``name`` (and its count is
    reached)."""
    hook = _hooks.get(name)
    if hook is not None:
        hook()
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= (int(count) if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)


def arm(name: str, hook: Hook) -> None:
    """Run ``hook`` each time point ``name`` is reached in this process (replacing any hook
    armed there before)."""
    if name not in POINTS:
        raise ValueError(f"no fault point named {name!r} (known: {', '.join(sorted(POINTS))})")
    _hooks[name] = hook


def disarm(name: str | None = None) -> None:
    """Remove the hook armed at ``name``, or every hook."""
    if name is None:
        _hooks.clear()
    else:
        _hooks.pop(name, None)
