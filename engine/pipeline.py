"""Keeping the network busy on a cohort: the next pair is read while the current one is registered,
and results are written while the next one is.

``prefetched(items, load)`` yields ``(item, load(item))`` in order, calling ``load`` for the
next item in a background thread while the caller works on the current one (decompressing
NIfTI and resampling release the GIL). ``BackgroundWriter`` runs write jobs (NIfTI outputs)
one after another in a background thread; ``close()`` waits for them and re-raises the first
error. Both run one job at a time, so at most one pair is held in memory ahead of the network.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def prefetched(items: Iterable, load: Callable, enabled: bool = True) -> Iterator[tuple]:
    """``(item, load(item))`` for every item in order; the next load runs in the background.

    An exception raised by ``load`` is raised here when its item's turn comes; with
    ``enabled`` False everything runs in the caller's thread (the plain loop).
    """
    items = list(items)
    if not enabled or len(items) < 2:
        for item in items:
            yield item, load(item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending: Future = pool.submit(load, items[0])
        try:
            for i, item in enumerate(items):
                value = pending.result()
                if i + 1 < len(items):
                    pending = pool.submit(load, items[i + 1])
                yield item, value
        finally:
            pending.cancel()


class BackgroundWriter:
    """Runs ``submit(fn, *args)`` jobs in order in one background thread."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._jobs: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True) if enabled else None
        if self._thread is not None:
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args = job
            if self._error is None:
                try:
                    fn(*args)
                except BaseException as exc:          # kept and re-raised by close()
                    self._error = exc

    def submit(self, fn: Callable, *args) -> None:
        if self._error is not None:
            self.close()
        if self._thread is None:
            fn(*args)
        else:
            self._jobs.put((fn, args))

    def close(self) -> None:
        """Wait for every job; raise the first job's error, if any."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


__all__ = ["prefetched", "BackgroundWriter"]
