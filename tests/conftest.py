"""Root conftest: registers the environment fixtures and marks tests by directory.

Tests under ``tests/db/`` get the ``db`` marker and tests under ``tests/e2e/`` get ``e2e``,
so ``pytest -m 'not e2e'`` skips everything needing the control plane without every test
module remembering to mark itself.
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
_MARKERS_BY_DIR = {"db": pytest.mark.db, "e2e": pytest.mark.e2e}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Add the ``db``/``e2e`` marker to every test collected below that directory."""
    for item in items:
        try:
            top = item.path.resolve().relative_to(_TESTS).parts[0]
        except (ValueError, IndexError):
            continue
        marker = _MARKERS_BY_DIR.get(top)
        if marker is not None:
            item.add_marker(marker)


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
