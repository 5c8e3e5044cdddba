"""The cyclic garbage collector's policy for the long-running role processes.

CPython's default policy collects the youngest generation every 700 net allocations. A request
that builds a large answer (a ``/recall/batch`` of 64 × 100 results as dicts is ~30,000 objects,
as the router's still is; a trainer round's batch as many) is still alive at those collections, so its objects are promoted
as if long-lived, and the oldest generation fills with them: full collections, which walk every
tracked object of the process (the catalog, the users, the histories), then ran about every
0.3 s under batch load, ~57 ms each at 20,000 items, and they grow with the state (a million
items would take seconds each: extrapolated, not measured). With the youngest generation
collected every 50,000 allocations a request's objects die before a collection sees them;
measured on the indexer under ``streamrecall bench query``'s batch load (a scratch driver with a
``gc.callbacks`` timer, one run each): 70 full collections in one run down to 1, and 3,368 →
5,629 queries/s (docs/benchmarks.md; the indexer has since stopped building an object per row,
index/json_rows.py). Cyclic garbage is still collected, just later; memory is unchanged
(allocations are reference-counted and freed at once whatever the collector does).

After a catch-up, the state it built (what a replay or restart loaded) is frozen
(``gc.freeze``): moved out of the collector's view, so later full collections walk only what
was allocated since. It stays reference-counted: objects freed later are freed as before; only
a reference cycle inside the frozen state would never be collected, and the state's records
(events, vectors, deques of ids) hold none.
"""

from __future__ import annotations

import gc

#: Net allocations between collections of the youngest generation (CPython's default: 700).
YOUNG_THRESHOLD = 50_000


def configure() -> None:
    """The role processes' policy; called once at start (``run_role``)."""
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)


def freeze_state() -> None:
    """Collect the young generations, then move everything alive out of the collector's view."""
    gc.collect(1)
    gc.freeze()
