"""Worker processes that do not outlive the program that started them.

The data generators spread chunks of xTB relaxations and MD runs over spawned processes. A
spawned ``ProcessPoolExecutor`` worker holds both ends of its task queue, so when the main
process is killed (SIGTERM, SIGKILL, the end of a session) its workers never see the queue
close and wait forever, each holding its memory. :func:`spawn_pool`'s workers watch their
parent and exit when it is gone.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from collections.abc import Callable

#: How often a worker checks that its parent is alive (seconds).
PARENT_CHECK_S = 1.0


def _exit_when_parent_dies(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_CHECK_S)
        # A process whose parent died is adopted by another (init or a subreaper).
        if os.getppid() != parent_pid:
            os._exit(1)


def _start_worker(parent_pid: int, initializer: Callable[[], None] | None) -> None:
    threading.Thread(target=_exit_when_parent_dies, args=(parent_pid,), name="zoo-parent-watch", daemon=True).start()
    if initializer is not None:
        initializer()


def spawn_pool(n_workers: int, initializer: Callable[[], None] | None = None) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of ``n_workers`` spawned processes (``initializer`` runs in each first) that exit when this process dies.

    Spawned, not forked: the parent runs JAX threads, which a fork would copy mid-flight.
    """
    return concurrent.futures.ProcessPoolExecutor(
        n_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(os.getpid(), initializer)
    )
