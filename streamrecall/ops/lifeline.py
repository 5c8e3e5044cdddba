"""Child processes that die with their parent: `streamrecall up` owns its broker and roles.

A child started with :func:`die_with_parent` as its ``preexec_fn`` asks Linux
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to be killed the moment its parent goes, for whatever
reason: a clean exit, a crash, or a SIGKILL that leaves no chance to stop anything. Without it the
broker and the roles (each in its own session, so a terminal's Ctrl-C reaches only the parent) ran
on as orphans. SIGKILL, not SIGTERM: the parent died, nothing will flush against its broker, and
every role is at-least-once from its durable state anyway.

The signal fires when the *thread* that forked the child exits, so children are tied only when
started from the main thread (which lives as long as the process); elsewhere, and off Linux, they
are started as before and stopped by their owner.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # resolved now: nothing is looked up after fork
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that ties the child's life to this process, or None where that is not possible."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl, parent = _PRCTL, os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no locks, no imports
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec
