"""Worker processes for CPU-bound work, shared by the whole server.

Parsing input files, rendering results files and answering large batches of
a local model (echo: see executor.py) are pure CPU work; on the event loop
they would hold the GIL against every RPC and use one core. They
run here instead, in processes started on first use (``longbatch serve``
starts them at boot).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .memory import keep_freed_memory

_NICE = 10


def _init_worker() -> None:
    """Pool initializer: leave shutdown to the server, end this worker when
    the server process dies, keep freed memory (server/memory.py), and
    yield the CPU to the server process.

    Ctrl-C reaches the whole process group; the server shuts the pool down
    in order, so a worker ignores SIGINT rather than dying mid-task with a
    traceback. A SIGKILLed server runs no shutdown code, and orphaned
    workers would live on holding its stdout open.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    # Background work: when the cores are busy, the server process, which
    # answers RPCs and runs requests, goes first.
    os.nice(_NICE)
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class WorkerPool:
    """A lazily started process pool; ``workers=0`` means none (callers then
    run the work in-process)."""

    def __init__(self, workers: int = 2) -> None:
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._warmed = False

    @property
    def workers(self) -> int:
        """The configured number of processes."""
        return self._workers

    def get(self) -> Executor | None:
        """The pool, or None when configured with no workers."""
        if self._workers <= 0:
            return None
        if self._pool is None:
            # spawn: forking a process that runs gRPC threads is unsafe.
            self._pool = ProcessPoolExecutor(
                self._workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
            )
        return self._pool

    def warm(self) -> None:
        """Start the workers now (about half a second each) so that the next
        large job does not wait for them."""
        pool = self.get()
        if pool is not None and not self._warmed:
            self._warmed = True
            for _ in range(self._workers):
                pool.submit(int)  # a no-op task makes the pool start a worker

    def drop_if_broken(self, error: BaseException) -> None:
        """After ``error`` from the pool: if it says the pool is broken (a
        worker died, say killed for memory), shut it down so that the next
        ``get`` starts a fresh one; a broken pool refuses all work forever."""
        if isinstance(error, BrokenProcessPool) and self._pool is not None:
            pool, self._pool, self._warmed = self._pool, None, False
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers; safe to call twice."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._warmed = False
