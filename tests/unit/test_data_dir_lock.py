"""The data directory's lock: one cluster per directory, released however its holder ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from arqonbus_server.mesh.local import DataDirInUse, DataDirLock
from tests.timeouts import SEC

HOLD = """
import sys
from pathlib import Path
from arqonbus_server.mesh.local import DataDirLock
DataDirLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_lock_on_the_same_directory_is_refused_until_the_first_is_released(
    tmp_path: Path,
) -> None:
    first, second = DataDirLock(tmp_path), DataDirLock(tmp_path)
    first.acquire()
    first.acquire()  # idempotent for its holder
    with pytest.raises(DataDirInUse) as refused:
        second.acquire()
    assert refused.value.holder_pid == os.getpid()
    assert str(tmp_path) in str(refused.value)
    first.release()
    second.acquire()
    assert second.held and not first.held
    second.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            with pytest.raises(DataDirInUse) as refused:
                DataDirLock(tmp_path).acquire()
            assert refused.value.holder_pid == holder.pid
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=10 * SEC)
    lock = DataDirLock(tmp_path)
    lock.acquire()  # the kernel dropped the dead holder's flock
    lock.release()
