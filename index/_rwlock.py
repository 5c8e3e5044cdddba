"""A phase-fair reader-writer lock.

hnswlib releases the GIL inside ``knn_query`` and ``add_items``, and its own notes
(confirmed here, see docs/index.md) say that only searches may run concurrently with
each other: ``add_items``, ``mark_deleted``, ``resize_index`` and ``save_index``
must not overlap a search. Readers share the lock; a writer holds it alone.

Fairness both ways: a waiting writer stops new readers from entering (queries
cannot starve ingestion), and when a writer lets go, the readers that were
waiting enter before the next writer (a writer looping over chunks cannot starve
queries), so a query waits for at most one write. Not reentrant.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # holding the lock
        self._writer = False
        self._waiting_writers = 0
        self._waiting_readers = 0
        self._passes = 0  # waiting readers admitted ahead of the next writer

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            if self._writer or self._waiting_writers:
                self._waiting_readers += 1
                try:
                    while self._writer or (self._waiting_writers and not self._passes):
                        self._cond.wait()
                finally:
                    self._waiting_readers -= 1
                    if self._passes:
                        self._passes -= 1
                    self._passes = min(self._passes, self._waiting_readers)
                    if not self._passes:
                        self._cond.notify_all()  # writers may be waiting for the last pass
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers or self._passes:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._passes = self._waiting_readers
                self._cond.notify_all()
