"""Log lines a platform team can grep: a timestamp, the level, and the policy.

Kopf's own per-object lines carry ``[namespace/name]``; the package's module loggers
(workflow, engine, lifecycle) do not know which policy they serve.  The handler boundary
names it for its thread (:func:`policy`), and a filter on the root handlers prefixes every
line logged in that thread with it, so ``grep ns/app`` finds a rotation's whole story.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_local = threading.local()


@contextmanager
def policy(namespace: str, name: str) -> Iterator[None]:
    """Lines logged in this thread meanwhile name ``namespace/name``."""
    before = getattr(_local, "policy", None)
    _local.policy = f"{namespace}/{name}"
    try:
        yield
    finally:
        _local.policy = before


#: Kopf's line for every successful run of the frequent, silent timer (noise).
_QUIET = ("Timer 'watch-inputs' succeeded", "Handler 'spec_changed_while_retrying' succeeded")


class PolicyPrefix(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_QUIET):
            return False
        current = getattr(_local, "policy", None)
        if current and not hasattr(record, "k8s_ref") and isinstance(record.msg, str) \
                and not getattr(record, "_policy_prefixed", False):
            record.msg = f"[{current}] {record.msg}"
            record._policy_prefixed = True
        return True


def configure() -> None:
    """Add the prefix to every handler of the root logger (after ``kopf.configure``)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, PolicyPrefix) for f in handler.filters):
            handler.addFilter(PolicyPrefix())
