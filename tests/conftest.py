"""Root conftest: registers the fixture plugins and marks tests by what they need.

A test gets ``db`` (the PostgreSQL harness), ``e2e`` (the control plane) or ``hsm``
(SoftHSM2) when it lives in ``tests/db/``, ``tests/e2e/`` or ``tests/hsm/``, or wherever
it lives when it uses the fixture that starts that environment (``postgres``,
``control_plane``, ``softhsm``, also through another fixture); tests under
``tests/harness/`` (the harness's own tests) get ``harness`` too.  So ``pytest -m 'not e2e'``
skips everything needing the control plane, and ``-m hsm`` runs everything needing
SoftHSM2, without every test module remembering to mark itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.fix_app",
    "tests.fixtures.fix_cluster",
    "tests.fixtures.fix_db",
    "tests.fixtures.fix_faults",
    "tests.fixtures.fix_operator",
    "tests.fixtures.fix_hsm",
    "tests.fixtures.fix_prometheus",
]

_TESTS = Path(__file__).resolve().parent
_MARKERS_BY_DIR = {"db": "db", "e2e": "e2e", "hsm": "hsm", "harness": "harness"}
_MARKERS_BY_FIXTURE = {"postgres": "db", "control_plane": "e2e", "softhsm": "hsm"}


def _markers_for(item: pytest.Item) -> set[str]:
    """The markers :func:`pytest_collection_modifyitems` gives ``item``."""
    names: set[str] = set()
    try:
        top = item.path.resolve().relative_to(_TESTS).parts[0]
    except (ValueError, IndexError):
        top = ""
    if top in _MARKERS_BY_DIR:
        names.add(_MARKERS_BY_DIR[top])
    for fixture in getattr(item, "fixturenames", ()):
        if fixture in _MARKERS_BY_FIXTURE:
            names.add(_MARKERS_BY_FIXTURE[fixture])
    return names


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Add the ``db``/``e2e``/``hsm``/``harness`` markers each test needs."""
    for item in items:
        for name in sorted(_markers_for(item)):
            item.add_marker(name)


_MEASURED: list[str] = []


@pytest.fixture
def report_measure() -> Callable[[str], None]:
    """A figure a test measured (a failover time, a recovery time): printed in pytest's
    terminal summary, so it shows in every run's output, ``-q`` included."""
    return _MEASURED.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _MEASURED:
        terminalreporter.section("measured")
        for line in _MEASURED:
            terminalreporter.write_line(line)
