"""How the harness judges its server processes (``hack/testenv/testenv.py`` ``_Server``).

For a child it started, ``Popen`` is the truth; from a pidfile (another invocation), the
process start time recorded at launch, never the command line (which reads empty during
``execve``).  The stand-in "server" here is ``sleep``: its command line does not name the
binary the server claims to be, which is exactly what a check on ``cmdline`` got wrong.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from tests.fixtures._env import testenv


def _server(tmp_path: Path) -> testenv._Server:
    return testenv._Server("etcd", "etcd", tmp_path / "etcd.pid", tmp_path / "etcd.log")


def test_an_own_child_is_judged_by_popen_not_by_its_command_line(tmp_path: Path) -> None:
    srv = _server(tmp_path)
    srv.start(["sleep", "30"])
    try:
        assert srv.running()
        srv.check_alive()
        # Another invocation reads the pidfile: the start time identifies the process.
        other = _server(tmp_path)
        assert other.proc is None and other.running()
        assert other.pid() == srv.pid()
    finally:
        pid = srv.pid()
        srv.stop()
    assert pid is not None and not psutil.pid_exists(pid)  # stopped and reaped
    assert not srv.pidfile.exists()


def test_a_recorded_pid_with_another_start_time_is_not_ours(tmp_path: Path) -> None:
    srv = _server(tmp_path)
    srv.start(["sleep", "30"])
    try:
        record = json.loads(srv.pidfile.read_text())
        srv.pidfile.write_text(json.dumps({**record, "create_time": record["create_time"] - 5}))
        stranger = _server(tmp_path)
        assert not stranger.running()  # a reused pid: never signalled by ``stop``
        stranger.stop()
        assert psutil.Process(record["pid"]).is_running()
    finally:
        srv.stop()


def test_a_server_that_exits_is_reported_with_its_exit_code(tmp_path: Path) -> None:
    srv = _server(tmp_path)
    srv.start(["sh", "-c", "echo failing on purpose; exit 3"])
    deadline = time.monotonic() + 10
    while srv.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(testenv.TestEnvError, match="exit code 3") as info:
        srv.check_alive()
    assert "failing on purpose" in str(info.value)
    srv.stop()


def test_stop_takes_down_the_whole_process_group(tmp_path: Path) -> None:
    srv = _server(tmp_path)
    # A server that forks a helper which ignores SIGTERM: SIGKILL must follow.
    srv.start(["sh", "-c", "(trap '' TERM; sleep 60) & wait"])
    time.sleep(0.3)
    pgid = srv.pid()
    assert pgid is not None
    members = testenv._group_members(pgid)
    assert len(members) >= 2
    srv.stop(timeout=1)
    assert testenv._group_members(pgid) == []
