"""A sharded index on a real broker: two `streamrecall run indexer --shard I --shards 2` processes,
`streamrecall run router` in front of them, and one plain indexer over the same items to compare.

Real processes, real hnswlib and torch, the session's embedded broker over a socket. The router's
answers must be the single indexer's (overlap@100 >= 0.99) for users (stored vectors and vectors
of another model version, encoded at query time by the shards), for vectors, with exclusions and
category caps, before and after a model update (scored by the one version every replica serves);
with one shard SIGKILLed the router still answers, flagged partial, from the other, and the shard
restarts from its own snapshot.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from streamrecall.devtools.harness import LocalSystem
from streamrecall.events import Click, Item
from streamrecall.model import ModelConfig, OnlineTrainer

pytestmark = pytest.mark.integration
MODEL = {"id_buckets": 4096, "token_buckets": 4096, "estimator_buckets": 4096, "dim": 32}
N_ITEMS = 1200
K = 100


def call(url: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(what: str, check, timeout_s: float = 120.0, system: LocalSystem | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if system is not None:
            system.check_alive()
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def overlap(a: list[str], b: list[str]) -> float:
    return len(set(a) & set(b)) / max(1, len(set(b)))


def test_two_shards_and_a_router_answer_as_one_indexer_and_survive_a_killed_shard(broker, tmp_path: Path):
    options = {"indexer": {"snapshot_interval_s": 5, "quality_interval_s": 60, "overlap_interval_s": 60},
               "router": {"deadline_ms": 2000}}
    with LocalSystem(tmp_path / "sys", bootstrap_servers=broker.bootstrap_servers, roles=[], model=MODEL,
                     partitions=4, name="shards", options=options) as system:
        single = system.add_role("indexer", "single")
        shards = [system.add_role("indexer", f"shard{i}", args=("--shard", str(i), "--shards", "2"))
                  for i in range(2)]
        urls = ";".join(system.api(f"shard{i}") for i in range(2))
        system.add_role("router", "router", args=("--shard-urls", urls))
        rng = np.random.default_rng(3)
        now = int(time.time() * 1000)
        system.produce(("items", f"i{n}", {"item_id": f"i{n}", "created_at": now - n, "title": f"item {n} w{n % 37}",
                                           "categories": [f"c{n % 6}"], "tags": [f"t{n % 11}"]})
                       for n in range(N_ITEMS))
        users: dict[str, dict[str, Any]] = {}
        for u in range(24):
            recent = [f"i{int(j)}" for j in rng.choice(N_ITEMS, size=5, replace=False)]
            # version 0 is the seeded towers every replica serves (stored vectors used as they are);
            # version 7 is another one: each answer encodes the user from its recent items now
            users[f"u{u}"] = {"user_id": f"u{u}", "vector": rng.normal(size=32).round(5).tolist(),
                              "model_version": 0 if u % 2 else 7, "event_ts": now, "published_at": now,
                              "recent_items": recent}
        topic = system.settings.topics.user_vectors
        for uid, value in users.items():
            system.produce_raw(topic, uid.encode(), msgspec.json.encode(value))
        system.flush()

        def loaded() -> bool:
            counts = [system.get("/healthz", name)[1].get("items", 0) for name in ("single", "shard0", "shard1")]
            return counts[0] == N_ITEMS and counts[1] + counts[2] == N_ITEMS
        wait_for("every item indexed", loaded, system=system)
        wait_for("the users read", lambda: system.get("/healthz", "router")[1].get("user_vectors") == len(users)
                 and system.get("/healthz", "single")[1].get("user_vectors") == len(users), system=system)
        held = [system.get("/healthz", f"shard{i}")[1] for i in range(2)]
        assert all(h["items"] > 0 and h["user_vectors"] == 0 for h in held)  # a share of the items each, no users
        assert [h["shard"] for h in held] == [{"index": 0, "of": 2}, {"index": 1, "of": 2}]

        router, indexer = system.api("router"), system.api("single")
        overlaps = []
        for uid, value in users.items():
            for extra in ("", "&exclude_seen=1&max_per_category=10"):
                path = f"/recall?user_id={uid}&k={K}{extra}"
                (s1, via_router), (s2, direct) = call(router, path), call(indexer, path)
                assert s1 == s2 == 200, (via_router, direct)
                assert via_router["route"] == direct["route"] == "user-vector"
                assert via_router["partial"] is False and via_router["shards"]["answered"] == [0, 1]
                assert via_router["user_encoded"] == direct["user_encoded"] == \
                    ("stored" if value["model_version"] == 0 else "query-time")
                assert via_router["model_versions"]["scored"] == direct["model_versions"]["scored"]
                got = [r["item_id"] for r in via_router["results"]]
                if extra:
                    assert not set(value["recent_items"]) & set(got)
                    counts = np.unique([r["categories"][0] for r in via_router["results"]], return_counts=True)[1]
                    assert counts.max() <= 10
                overlaps.append(overlap(got, [r["item_id"] for r in direct["results"]]))
        for q in rng.normal(size=(10, 32)).round(5):
            body = {"vector": q.tolist(), "k": K}
            (s1, via_router), (s2, direct) = call(router, "/recall", body), call(indexer, "/recall", body)
            assert s1 == s2 == 200
            overlaps.append(overlap([r["item_id"] for r in via_router["results"]],
                                    [r["item_id"] for r in direct["results"]]))
        assert np.mean(overlaps) >= 0.99, sorted(overlaps)[:5]

        status, batch = call(router, "/recall/batch", {"k": 5, "queries": [{"user_id": "u1"}, {"vector": [0.1] * 32}]})
        assert status == 200 and [a["route"] for a in batch["results"]] == ["user-vector", "vector"]
        assert all(len(a["results"]) == 5 and a["partial"] is False for a in batch["results"])

        # No vector and no model update yet: the recent route, merged newest first.
        status, unknown = call(router, "/recall?user_id=nobody&k=10")
        assert status == 200 and unknown["route"] == "recent" and len(unknown["results"]) == 10
        assert [r["item_id"] for r in unknown["results"]] == [f"i{n}" for n in range(10)]

        # A model update (v1, full) reaches every replica: the router's answers are scored by v1, users
        # of v0 and v7 now encoded at query time by each shard, and still the single indexer's answers.
        catalog = {f"i{n}": Item(item_id=f"i{n}", created_at=now - n, title=f"item {n} w{n % 37}",
                                 categories=(f"c{n % 6}",), tags=(f"t{n % 11}",)) for n in range(N_ITEMS)}
        trainer = OnlineTrainer(ModelConfig(**MODEL))
        for step in range(3):
            clicks = [Click(user_id=f"u{j % 24}", item_id=f"i{(j * 13 + step) % N_ITEMS}", ts=j)
                      for j in range(64)]
            trainer.step(trainer.make_batch(clicks, catalog, [[] for _ in clicks]))
        system.produce_raw(system.settings.topics.model_updates, None, trainer.export_update(full=True))
        system.flush()
        wait_for("every replica at v1, re-encoded", lambda: all(
            (h := system.get("/healthz", name)[1]).get("model_version") == 1 and h.get("reencode_pending") == 0
            for name in ("single", "shard0", "shard1")), system=system)
        after = []
        for uid in list(users)[:8]:
            (s1, via_router), (s2, direct) = (call(router, f"/recall?user_id={uid}&k={K}"),
                                              call(indexer, f"/recall?user_id={uid}&k={K}"))
            assert s1 == s2 == 200
            assert via_router["model_versions"]["scored"] == direct["model_versions"]["scored"] == 1
            assert via_router["user_encoded"] == "query-time" and via_router["partial"] is False
            after.append(overlap([r["item_id"] for r in via_router["results"]],
                                 [r["item_id"] for r in direct["results"]]))
        assert np.mean(after) >= 0.99, after
        (s1, trending), (s2, direct) = (call(router, "/recall?user_id=nobody&k=10"),
                                        call(indexer, "/recall?user_id=nobody&k=10"))
        assert s1 == s2 == 200 and trending["route"] == direct["route"] == "trending"  # the update's list, merged
        assert [r["item_id"] for r in trending["results"]] == [r["item_id"] for r in direct["results"]]

        status, refused = call(system.api("shard0"), "/recall?user_id=u1&k=5")
        assert status == 400 and "router" in refused["error"]

        from streamrecall.consumers.roles.indexer import snapshot as indexer_snapshot

        shard1_state = system.settings.replace(shard=1, shards=2).role_state_dir("indexer")
        wait_for("shard 1's own snapshot of its items", lambda: sum(
            (indexer_snapshot.read_resume(shard1_state) or {}).get("offsets", {}).get("items", {}).values())
            >= held[1]["items"], system=system)
        port, admin = shards[1].settings.port_for("indexer"), shards[1].settings.admin_port_for("indexer")
        shards[1].kill()  # SIGKILL: the router must still answer, from shard 0, saying so
        shard0 = system.api("shard0")
        for uid in ("u1", "u2"):
            status, partial = call(router, f"/recall?user_id={uid}&k=20")
            assert status == 200, partial
            assert partial["partial"] is True and partial["shards"]["answered"] == [0]
            assert "1" in partial["shards"]["missing"]
            assert len(partial["results"]) == 20
            for r in partial["results"]:
                assert call(shard0, f"/items/{urllib.parse.quote(r['item_id'])}")[0] == 200
        assert (system.metric("streamrecall_router_incomplete_answers_total", "router", kind="partial") or 0) >= 2
        system.processes.pop("shard1")  # killed on purpose: not an unexpected exit

        # Restarted at the same address, shard 1 resumes from its own snapshot and the answers are whole again.
        system.add_role("indexer", "shard1", args=("--shard", "1", "--shards", "2", "--http-port", str(port),
                                                  "--admin-port", str(admin)))
        back = f"http://127.0.0.1:{port}"  # the harness knows it by the ports it gave, not the flags

        def restored() -> bool:
            health = call(back, "/healthz")[1]
            return health.get("snapshot_loaded") is True and health.get("items") == held[1]["items"]
        wait_for("shard 1 back from its snapshot", restored, system=system)
        wait_for("whole answers again", lambda: call(router, "/recall?user_id=u1&k=20")[1]["partial"] is False,
                 system=system)


def test_a_shard_of_more_shards_than_items_partitions_is_refused(broker, tmp_path: Path):
    with LocalSystem(tmp_path / "sys", bootstrap_servers=broker.bootstrap_servers, roles=[], model=MODEL,
                     partitions=2, name="toomany") as system:
        env = {**system.settings.to_env(), "PATH": "/usr/bin:/bin"}
        run = subprocess.run([sys.executable, "-m", "streamrecall", "run", "indexer", "--shard", "0", "--shards", "3",
                              "--http-port", "0", "--admin-port", "0"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode != 0
        assert "split in 3 shards" in run.stderr and "has 2 partition(s)" in run.stderr
