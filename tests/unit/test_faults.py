"""The named fault points: the list in :mod:`rotation_operator.faults` is the list the code
calls, hooks run where armed and only there, and the crash spec kills at the n-th hit."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rotation_operator import faults
from tests.fixtures.fix_faults import FaultHook

SRC = Path(faults.__file__).resolve().parent


def _called_points() -> set[str]:
    """Every name passed to ``faults.point("...")`` in the package's source."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "point" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "faults"):
                assert node.args and isinstance(node.args[0], ast.Constant), \
                    f"{path}: faults.point takes a literal name"
                names.add(str(node.args[0].value))
    return names


def test_every_point_the_code_calls_is_listed_and_documented() -> None:
    assert _called_points() == faults.POINTS
    doc = faults.__doc__ or ""
    assert [p for p in sorted(faults.POINTS) if f"``{p}``\n" not in doc] == []


def test_an_armed_hook_runs_at_its_point_only(fault_hook: FaultHook) -> None:
    hits: list[str] = []
    fault_hook("after-batch", lambda: hits.append("after-batch"))
    faults.point("after-batch")
    faults.point("before-finish")
    faults.point("after-batch")
    assert hits == ["after-batch", "after-batch"]


def test_what_a_hook_raises_propagates_from_the_point(fault_hook: FaultHook) -> None:
    class Boom(Exception):
        pass

    def boom() -> None:
        raise Boom

    fault_hook("before-finish", boom)
    with pytest.raises(Boom):
        faults.point("before-finish")


def test_disarmed_hooks_no_longer_run() -> None:
    hits: list[int] = []
    faults.arm("after-start", lambda: hits.append(1))
    faults.disarm("after-start")
    faults.point("after-start")
    faults.arm("after-start", lambda: hits.append(2))
    faults.disarm()
    faults.point("after-start")
    assert hits == []


def test_an_unknown_point_cannot_be_armed() -> None:
    with pytest.raises(ValueError, match="no fault point named 'after-bach'"):
        faults.arm("after-bach", lambda: None)


def test_the_crash_spec_kills_the_process_at_the_nth_hit() -> None:
    code = ("import sys\nfrom rotation_operator import faults\n"
            "for i in range(1, 4):\n"
            "    print(i, flush=True)\n"
            "    faults.point('after-batch')\n")
    env = {**os.environ, faults.ENV: "after-batch:2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["1", "2"]
