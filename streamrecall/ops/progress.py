"""Progress bars for long CLI work (generate, produce, bench, evaluate), quiet when not a terminal.

tqdm draws on stderr and only when stderr is a TTY (``disable=None``), so piped or CI output
and ``--json`` on stdout stay clean. Long-running roles do not use this: a service logs its
catch-up progress instead (``consumers/runtime.py`` ``CatchUpLog``).
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def bar(total: int | None = None, desc: str = "", unit: str = "records") -> "tqdm[object]":
    """A progress bar (a no-op object when stderr is not a terminal); use as a context manager."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=None, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, leave=False)


def track(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "records") -> Iterator[T]:
    """``items`` unchanged, with a progress bar while they are consumed."""
    with bar(total, desc, unit) as b:
        for item in items:
            yield item
            b.update(1)
