"""The harness must never misjudge a live server, and never leave one behind.

A cold page cache made ``testenv.py up`` declare a live etcd "exited during startup" (its
``/proc/PID/cmdline`` read empty during ``execve``) and leave it running as an orphan, since
``stop()`` trusted the same check.  These tests start and stop private control planes with
the binaries evicted from the page cache, also with both cores busy, and look for any
process left over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.fixtures._env import private_dir, remove_private_dir, testenv

#: Starts control planes of its own: it needs the control-plane binaries, as e2e tests do.
pytestmark = pytest.mark.e2e
BINARIES = ("etcd", "kube-apiserver")


@pytest.fixture
def cold_bin_dir(tmp_path: Path) -> Path:
    """Private copies of the server binaries: pages mapped by a running process (the
    session's own control plane uses the cached ones) cannot be evicted, copies can."""
    source = testenv.build_binaries()
    target = tmp_path / "bin"
    target.mkdir()
    for name in BINARIES:
        shutil.copy2(source / name, target / name)
        with open(target / name, "rb+") as f:
            os.fsync(f.fileno())  # written pages are clean only once on disk
    return target


def _resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache, as util-linux's ``fincore`` counts them."""
    out = subprocess.run(["fincore", "--noheadings", "--raw", "--output", "PAGES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def evict_from_page_cache(bin_dir: Path) -> None:
    """Make the server binaries cold: ``POSIX_FADV_DONTNEED`` drops their clean pages
    (no privilege needed), and as root the whole cache goes too."""
    for name in BINARIES:
        fd = os.open(bin_dir / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if os.geteuid() == 0:
        os.sync()
        # A container may not allow it: the fadvise above already did the job.
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for name in BINARIES:
        resident = _resident_pages(bin_dir / name)
        assert resident < 64, f"{name} still has {resident} pages cached"


def leftovers(state_dir: Path) -> list[str]:
    """Live processes whose command line names ``state_dir`` (servers of that plane)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if str(state_dir) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return found


def start_and_stop(bin_dir: Path) -> None:
    state_dir = private_dir("coldstart")
    plane = testenv.ControlPlane(state_dir, bin_dir)
    try:
        evict_from_page_cache(bin_dir)
        plane.start()
        assert plane.running() and plane.ready()
        # Another invocation (``down``) judges the same servers from the pidfiles alone.
        attached = testenv.ControlPlane.from_state(state_dir, plane.to_state())
        assert attached.running()
    finally:
        plane.stop()
        left = leftovers(state_dir)
        remove_private_dir(state_dir)
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def busy_cores() -> Iterator[None]:
    """Both cores spinning for the duration of a test."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for b in burners:
            b.kill()
            b.wait()


def test_start_and_stop_with_a_cold_page_cache(cold_bin_dir: Path) -> None:
    start_and_stop(cold_bin_dir)


def test_repeated_cold_starts_under_cpu_load_leave_nothing_behind(cold_bin_dir: Path,
                                                                  busy_cores: None) -> None:
    for _ in range(3):
        start_and_stop(cold_bin_dir)
