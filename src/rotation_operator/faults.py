"""Crash points for the kill -9 tests: a test sets ``ROTATION_OPERATOR_FAULT`` and the
process SIGKILLs itself exactly there.

Why in the product: "resumable after any crash" can only be proven by crashing at the
places that matter (after the new key is committed, between batches, inside an atomic
transaction, before the final commit), and a signal sent from outside cannot hit those
places reliably.  Unset (always, in production) it costs one dict lookup per batch.

Spec: ``<point>`` or ``<point>:<n>`` (the n-th time the point is reached, 1-based).
"""

from __future__ import annotations

import os
import signal

ENV = "ROTATION_OPERATOR_FAULT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process if the fault spec names ``name`` (and its count is reached)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= (int(count) if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)
