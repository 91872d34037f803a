"""Spawned worker processes end with the program that started them."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

#: The checkout holding the zoo these tests import, whatever folder pytest runs from.
REPO_ROOT = Path(__file__).resolve().parents[1]

PROGRAM = textwrap.dedent(
    """
    import os, sys, time
    from zoo._workers import spawn_pool

    if __name__ == "__main__":
        pool = spawn_pool(1)
        print(pool.submit(os.getpid).result(), flush=True)
        time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A dead child of ours that nobody reaped is a zombie; it is gone for our purpose.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_pool_worker_exits_when_its_program_is_killed(tmp_path, sig):
    """A plain spawned ProcessPoolExecutor worker would wait on its task queue forever once the
    program is killed; spawn_pool's worker notices its parent is gone and exits within seconds."""
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    program = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker = int(program.stdout.readline())
        assert worker != program.pid and _alive(worker)
        program.send_signal(sig)
        program.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), f"worker {worker} outlived its killed program"
    finally:
        program.kill()
        program.wait()
