"""The router's recall logic, without the transport: look the user up, ask every shard, merge.

:class:`RouterService` answers the same queries as one indexer (``GET``/``POST /recall``, the
batch form) over a sharded index. It owns the user-vector lookup (the router reads
``user-vectors``); the shards own the items and the towers. A user query goes to every shard as
the stored vector *with its model version and recent items*, so each shard scores by its own
current towers, using the vector as it is when its version made it and encoding the user from
the recent items otherwise: exactly what one indexer does (consumers/roles/indexer/scoring.py), and the query-
time encoding stays where the towers are. :mod:`.merge` keeps the answer to one model version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import msgspec
import numpy as np

from streamrecall.consumers.recall_api.rules import ApiError
from streamrecall.consumers.roles.router.fanout import Reply, ShardClient
from streamrecall.consumers.roles.router.merge import ShardAnswer, merge, needs_wider, one_version

log = logging.getLogger(__name__)

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


@dataclass(frozen=True)
class Plan:
    """How far a query fetches from each shard: ``first`` rows, widened ×4 up to ``limit`` (caps)."""

    first: int
    limit: int


class RouterService:
    """Answers recall queries by asking every shard; safe to call from several threads."""

    serves_items = False  # items live on the shards: no /items, no /recall/shard here

    def __init__(self, client: ShardClient, users: Any, config: Any, metrics: Any, dim: int,
                 cap: Callable[[Sequence[Any], int, int, Callable[[Any], Sequence[str]]], list[Any]],
                 health: HealthFn, overfetch: tuple[int, int], clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.users = users
        self.config = config
        self.metrics = metrics
        self.dim = dim
        self._cap = cap
        self.health = health
        self.max_overfetch_factor, self.min_overfetch = overfetch
        self.clock = clock

    # -------------------------------------------------------------- queries
    def recall_for_user(self, user_id: str, k: int, exclude_seen: bool = False,
                        max_per_category: int | None = None) -> dict[str, Any]:
        """Top ``k`` for a user over every shard; users without a vector get the trending route."""
        user = self.users.get(user_id)
        if user is not None and len(user.vector) != self.dim:
            log.warning("user %s has a %d-d vector, the model is %d-d: answering from trending",
                        user_id, len(user.vector), self.dim)
            user = None
        base: dict[str, Any] = {"user_id": user_id, "k": k}
        if user is None:
            query: dict[str, Any] = {}
            exclude: tuple[str, ...] = ()
        else:
            query = {"user": {"user_id": user_id, "vector": user.vector.tolist(),
                              "model_version": user.model_version, "recent_items": list(user.recent_items)}}
            exclude = tuple(user.recent_items) if exclude_seen else ()
        answer = self._ask(query, k, exclude, max_per_category)
        if user is not None:
            answer["model_versions"]["user_vector"] = user.model_version
        return base | answer

    def recall_for_vector(self, vector: np.ndarray, k: int, max_per_category: int | None = None,
                          exclude: Sequence[str] = ()) -> dict[str, Any]:
        """Top ``k`` for a caller's own vector over every shard (route ``vector``)."""
        return {"k": k} | self._ask({"vector": vector.tolist()}, k, tuple(exclude), max_per_category)

    def recall_together(self, queries: Sequence[Any]) -> list[dict[str, Any] | None]:
        """None for every query: each is its own fan-out (the shards answer in parallel anyway)."""
        return [None] * len(queries)

    # -------------------------------------------------------------- fan-out
    def plan(self, k: int, max_per_category: int | None) -> Plan:
        if max_per_category is None:
            return Plan(k, k)  # each shard's exact top-k: their union holds the global top-k
        limit = max(self.min_overfetch, k * self.max_overfetch_factor)
        return Plan(min(limit, 2 * k), limit)

    def _ask(self, query: dict[str, Any], k: int, exclude: tuple[str, ...],
             max_per_category: int | None) -> dict[str, Any]:
        """Ask every shard (``query`` plus ``k`` and exclusions), merge, widen for caps; the answer."""
        until = self.clock() + self.config.deadline_ms / 1000.0
        plan = self.plan(k, max_per_category)
        fetch = plan.first
        answers, missing = self._round(query | {"k": fetch, "exclude": list(exclude)}, fetch, until)
        if not answers:  # nothing answered at all: no answer to give
            self.metrics.partial.labels("none").inc()
            raise _no_shard(missing)
        kept = self._merge(answers, k, exclude, max_per_category)
        while (max_per_category is not None and self.clock() < until
               and needs_wider(list(answers.values()), len(kept), k, fetch, plan.limit)):
            fetch = min(plan.limit, fetch * 4)
            wider, wider_missing = self._round(query | {"k": fetch, "exclude": list(exclude)}, fetch, until)
            if len(wider) < len(answers) or _version(wider) != _version(answers):
                break  # the wider round lost a shard or saw another version: the narrower answer stands
            answers, missing = wider, wider_missing
            kept = self._merge(answers, k, exclude, max_per_category)
        return self._answer(answers, missing, kept)

    def _merge(self, answers: dict[int, ShardAnswer], k: int, exclude: tuple[str, ...],
               max_per_category: int | None) -> list[dict[str, Any]]:
        return merge(list(answers.values()), k, exclude=exclude, max_per_category=max_per_category,
                     cap=lambda rows, n, c: self._cap(rows, n, c, lambda r: r["categories"]))

    def _round(self, body: dict[str, Any], fetch: int, until: float) -> tuple[dict[int, ShardAnswer], dict[int, str]]:
        """One request to every shard, asking shards behind the newest version again until ``until``.

        Returns the answers (all of one model version) and, for every shard left out, why."""
        raw = msgspec.json.encode(body)
        pending = list(range(len(self.client)))
        answers: dict[int, ShardAnswer] = {}
        missing: dict[int, str] = {}
        while pending:
            replies = self.client.ask({s: raw for s in pending}, max(0.0, until - self.clock()))
            for shard, reply in replies.items():
                if isinstance(reply, Reply):
                    answers[shard] = _shard_answer(reply, fetch)
                    missing.pop(shard, None)
                    self.metrics.shard_requests.labels(str(shard), "ok").inc()
                    self.metrics.shard_seconds.labels(str(shard)).observe(reply.seconds)
                else:
                    answers.pop(shard, None)
                    missing[shard] = f"{reply.reason}: {reply.detail}"
                    self.metrics.shard_requests.labels(str(shard), reply.reason).inc()
                    if reply.reason == "error":
                        log.warning("shard %d refused the router's request: %s", shard, reply.detail)
            version, behind = one_version(list(answers.values()))
            pending = []
            if behind:
                for shard in behind:  # an update behind the newest: asked again, else left out
                    self.metrics.shard_requests.labels(str(shard), "behind").inc()
                    missing[shard] = f"behind: scored by v{answers[shard].version}, the others by v{version}"
                    del answers[shard]
                if self.clock() + self.config.behind_retry_ms / 1000.0 < until:
                    time.sleep(self.config.behind_retry_ms / 1000.0)
                    pending = behind
        return answers, missing

    def _answer(self, answers: dict[int, ShardAnswer], missing: dict[int, str],
                rows: list[dict[str, Any]]) -> dict[str, Any]:
        if missing:
            self.metrics.partial.labels("partial").inc()
            if self.config.partial == "refuse":
                raise _no_shard(missing, partial=True)
        any_answer = next(iter(answers.values()))
        version = any_answer.version
        encoded = {a.user_encoded for a in answers.values()} - {None}
        out: dict[str, Any] = {"route": any_answer.route}
        if any_answer.route in ("user-vector",):
            out["compatible"] = True
            out["user_encoded"] = "stored" if encoded == {"stored"} else "query-time"
        # every shard that answered is at ``version`` (merge.one_version): the answer's scores all come from it
        out["model_versions"] = {"user_vector": None, "scored": version, "index": version}
        out["partial"] = bool(missing)
        out["shards"] = {"total": len(self.client), "answered": sorted(answers),
                         "missing": {str(s): why for s, why in sorted(missing.items())}}
        out["results"] = [{"rank": r["rank"], "item_id": r["item_id"], "categories": r["categories"],
                           "score": r["score"], "model_version": r["model_version"]} for r in rows]
        return out


def _version(answers: dict[int, ShardAnswer]) -> int | None:
    return one_version(list(answers.values()))[0]


def _shard_answer(reply: Reply, asked: int) -> ShardAnswer:
    body = reply.body
    return ShardAnswer(shard=reply.shard, route=body["route"], version=int(body["version"]), rows=body["rows"],
                       asked=asked, user_encoded=body.get("user_encoded"), url=reply.url)


def _no_shard(missing: dict[int, str], partial: bool = False) -> ApiError:
    """The 503 of an answer that cannot be given: no shard answered (or, with ``partial = "refuse"``, one did not)."""
    what = "; ".join(f"shard {s}: {why}" for s, why in sorted(missing.items()))
    if partial:
        return ApiError(503, f"not every shard answered (router.partial = refuse): {what}")
    return ApiError(503, f"no shard answered: {what}")
