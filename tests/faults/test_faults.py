"""Fault injection against the real system: a real broker, the three roles as real processes,
real hnswlib and torch. Faults: SIGKILL of every role at random points, a hostile-input
corpus mixed into the stream, replay into a fresh state directory, the broker paused
(SIGSTOP) and resumed, a second trainer and publisher joining and leaving, and a full or
read-only state directory. Invariants are checked from outside (docs/reliability.md).

Size: STREAMRECALL_FAULTS_SCALE=full (≥100k clicks, ≥10k items, ≥5 kills per role, 20 s
pause, 5,000 bad records); by default a reduced size for CI.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

import faultkit as fk
from streamrecall.devtools.harness import LocalSystem, pid_running, start_up
from streamrecall.ops.status import high_watermarks

S = fk.scale()
pytestmark = [pytest.mark.integration, pytest.mark.faults,
              pytest.mark.timeout(2400 if S.name == "full" else 600)]
SEED = int(os.environ.get("STREAMRECALL_FAULTS_SEED", "20240917"))


@contextmanager
def local_system(tmp_path: Path, name: str, roles: tuple[str, ...] = fk.ROLES,
                 before_roles: "callable | None" = None, settings: dict | None = None) -> Iterator[LocalSystem]:
    system = LocalSystem(tmp_path / "state", model=fk.MODEL, options=fk.OPTIONS, name=name, roles=(),
                         settings=settings)
    with system:
        if before_roles is not None:
            before_roles(system)
        for role in roles:
            system.add_role(role)
        yield system


@contextmanager
def watching(path: Path) -> Iterator[fk.CheckpointWatch]:
    """Samples the trainer's checkpoint every 0.3 s in the background."""
    watch = fk.CheckpointWatch(path)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.3):
            try:
                watch.sample()
            except (OSError, ValueError, KeyError):
                pass  # a checkpoint being replaced: the next sample reads it
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(5)


def assert_alive(system: LocalSystem, names: list[str] | None = None) -> None:
    for name in names or list(system.processes):
        proc = system.processes[name]
        assert proc.alive, f"{name} exited by itself ({proc.process.returncode}):\n{fk.log_tail(system, name)}"


def clicks_high(system: LocalSystem) -> int:
    topic = system.settings.topics.clicks
    return sum(high_watermarks(system.settings, [topic]).values())


def trainer_caught_up(system: LocalSystem, state_dir: Path | None = None) -> list[str]:
    cp = fk.read_checkpoint((state_dir or system.state_dir) / "trainer" / "checkpoint.safetensors")
    high = clicks_high(system)
    if cp is None or cp.next_offsets != high:
        return [f"trainer checkpoint covers {cp.next_offsets if cp else None} of {high} click offsets"]
    return []


def converge(system: LocalSystem, checks: fk.Checks, timeout_s: float) -> list[str]:
    """After the last fault: every role catches up and the end state holds (polled, bounded)."""
    deadline = time.monotonic() + timeout_s
    problems: list[str] = []
    for what, check in (("lag", lambda: [] if system.wait_caught_up(5, 0.5) else ["group lag not zero"]),
                        ("trainer", lambda: trainer_caught_up(system)),
                        ("index", checks.index_exact),
                        ("user vectors", checks.user_vectors)):
        problems = fk.wait_until(what, check, max(5.0, deadline - time.monotonic()))
        if problems:
            return [f"{what}: {p}" for p in problems]
    return problems


def other_model_update() -> bytes:
    """A well-formed update made for a different model (another dimension): must be refused."""
    from streamrecall.model import ModelConfig, OnlineTrainer
    return OnlineTrainer(ModelConfig(**{**fk.MODEL, "dim": 4})).export_update()


def produce_chunk(system: LocalSystem, ledger: fk.Ledger, events, odd_groups, bad) -> None:  # type: ignore[no-untyped-def]
    fk.produce_events(system, ledger, events)
    for group in odd_groups:
        ledger.valid_odd += len(group)
        fk.produce_events(system, ledger, group)
    if bad:
        fk.produce_bad(system, ledger, bad)


# --------------------------------------------------------------------------- SIGKILL + hostile + replay
def test_sigkill_every_role_with_hostile_input_then_replay(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    ledger = fk.Ledger()
    events = fk.synthetic(S, SEED)
    bad_parts = fk.chunks(fk.hostile_bad(rng, S.hostile, other_model_update), S.chunks)
    odd_parts = fk.chunks(fk.hostile_valid(rng, S.hostile_valid, fk.TS0), S.chunks)
    parts = fk.chunks(events, S.chunks)
    plan: dict[int, list[str]] = {}
    for role in fk.ROLES:  # kill points: distinct chunks per role, anywhere but the first
        for i in rng.sample(range(1, len(parts)), S.kills_per_role):
            plan.setdefault(i, []).append(role)
    kills = {r: 0 for r in fk.ROLES}
    restarts: list[tuple[int, fk.Checkpoint | None]] = []

    with local_system(tmp_path, "kill") as system, \
            watching(system.state_dir / "trainer" / "checkpoint.safetensors") as watch:
        checks = fk.Checks(system, ledger)
        for i, part in enumerate(parts):
            produce_chunk(system, ledger, part, odd_parts[i] if i < len(odd_parts) else [],
                          bad_parts[i] if i < len(bad_parts) else [])
            for role in rng.sample(plan.get(i, []), len(plan.get(i, []))):
                time.sleep(rng.uniform(0.0, S.chunk_pause_s))  # a random point of the role's work
                assert_alive(system, [role])
                system.processes[role].kill()
                kills[role] += 1
                time.sleep(rng.uniform(0.2, 1.0))
                if role == "trainer":
                    at = sum(high_watermarks(system.settings, [system.settings.topics.model_updates]).values())
                    restarts.append((at, watch.sample()))  # the last checkpoint before the kill
                system.processes[role].start()
            time.sleep(S.chunk_pause_s)
        assert_alive(system)

        problems = converge(system, checks, S.converge_s)
        dl_problems, per_role = checks.deadletters()
        problems += dl_problems
        problems += checks.model_updates(restarts)
        watch.sample()
        problems += [f"checkpoint went backwards: {a} -> {b}" for a, b in watch.backwards]
        assert_alive(system)
        kill_checks = ["index = live items (GET /items/{id} each, /healthz count)",
                       "every user with clicks has a vector covering its newest click",
                       "trainer checkpoints (steps, estimator step, clicks trained) never decrease",
                       "updates after a restart ≥ the checkpoint's steps; versions strictly increase"]
        fk.record("SIGKILL of each role at random points", sum(kills.values()), kill_checks,
                  "nothing" if not problems else "; ".join(problems[:3]), "sigkill",
                  kills=kills, stream=fk.user_counts(ledger), checkpoints_seen=len(watch.seen))
        fk.record("hostile-input corpus mixed into the stream", len(ledger.bad) + ledger.valid_odd,
                  [f"{len(ledger.bad)} bad records {fk.per_topic(ledger.bad)}: each dead-lettered once per role "
                   "that reads it, with its reason; nothing else dead-lettered",
                   f"{ledger.valid_odd} odd-but-valid events take effect", "no role exited"],
                  "nothing" if not problems else "; ".join(problems[:3]), "sigkill",
                  deadletters_per_role=dict(per_role))
        assert not problems, "\n".join(problems)

        # Replay: a fresh indexer from the earliest offsets into a new state directory.
        system.add_role("indexer", name="indexer-replay", args=("--from", "earliest"),
                        state_dir=tmp_path / "replay-state", group_prefix=system.settings.group_prefix + "-replay")
        problems = fk.wait_until("replay", lambda: replay_settled(system), S.converge_s)
        problems = problems or checks.index_exact("indexer-replay") or compare_vectors(system, ledger)
        problems += checks.deadletters()[0]  # the replay dead-letters nothing again
        fk.record("replay: fresh indexer --from earliest into a new state dir", 1,
                  ["same live items as the running indexer", "same vectors (max |Δ| ≤ 1e-5) where encoded by the same version, else within twice the drift bound",
                   "no dead letter repeated"], "nothing" if not problems else "; ".join(problems[:3]), "sigkill")
        assert not problems, "\n".join(problems)


def replay_settled(system: LocalSystem) -> list[str]:
    bodies = {}
    for name in ("indexer", "indexer-replay"):
        status, body = system.get("/healthz", name)
        if status != 200:
            return [f"{name} not ready: {body}"]
        if body["reencode_pending"] or body["settled_version"] != body["model_version"]:
            return [f"{name} still re-encoding: {body}"]
        bodies[name] = body
    a, b = bodies["indexer"], bodies["indexer-replay"]
    if (a["model_version"], a["items"]) != (b["model_version"], b["items"]):
        return [f"versions/items differ: {a['model_version']}/{a['items']} vs {b['model_version']}/{b['items']}"]
    return []


def compare_vectors(system: LocalSystem, ledger: fk.Ledger, tolerance: float = 1e-5,
                    drift_bound: float = 0.05) -> list[str]:
    """Each live item's stored vector in both indexers: the same (max |delta| <= ``tolerance``) where
    both were encoded by the same model version. An item re-encodes only once its vector may have
    drifted past ``drift_bound`` (the indexer's ``reencode_drift_bound``, a share of its norm), so
    where the two followed different paths and hold vectors of different versions, each is within
    that bound of the current encoding: the two differ by at most twice it (L2, relative)."""
    worst, worst_id, worst_apart, apart_id, apart = 0.0, None, 0.0, None, 0
    for item in sorted(ledger.live):
        _, a = system.get(f"/items/{item}?with_vector=1", "indexer", admin=True)
        _, b = system.get(f"/items/{item}?with_vector=1", "indexer-replay", admin=True)
        if a["model_version"] == b["model_version"]:
            diff = max(abs(x - y) for x, y in zip(a["vector"], b["vector"]))
            if diff > worst:
                worst, worst_id = diff, item
            continue
        apart += 1
        norm = max(math.hypot(*a["vector"]), math.hypot(*b["vector"]), 1e-12)
        rel = math.hypot(*(x - y for x, y in zip(a["vector"], b["vector"]))) / norm
        if rel > worst_apart:
            worst_apart, apart_id = rel, item
    problems = [] if worst <= tolerance else [f"vectors of the same version differ by up to {worst:.3g} (e.g. {worst_id})"]
    if worst_apart > 2 * drift_bound * (1 + drift_bound):
        problems.append(f"vectors of different versions ({apart} items) differ by up to {worst_apart:.3g} of their "
                        f"norm, more than twice the drift bound {drift_bound} (e.g. {apart_id})")
    return problems


# --------------------------------------------------------------------------- broker pause
def test_broker_paused_and_resumed(tmp_path: Path) -> None:
    ledger = fk.Ledger()
    parts = fk.chunks(fk.synthetic(S, SEED + 1), max(4, S.chunks // 4))
    with local_system(tmp_path, "pause") as system, \
            watching(system.state_dir / "trainer" / "checkpoint.safetensors") as watch:
        checks = fk.Checks(system, ledger)
        pids = {}
        broker_pid = broker_process(system)
        for i, part in enumerate(parts):
            fk.produce_events(system, ledger, part)
            if i == 1:
                pids = {n: p.process.pid for n, p in system.processes.items()}
            if i == len(parts) // 2:
                time.sleep(0.5)  # the roles are mid-stream
                os.kill(broker_pid, signal.SIGSTOP)
                time.sleep(S.broker_pause_s)
                os.kill(broker_pid, signal.SIGCONT)
            time.sleep(S.chunk_pause_s / 2)
        problems = converge(system, checks, S.converge_s)
        problems += checks.deadletters()[0]
        problems += [f"checkpoint went backwards: {a} -> {b}" for a, b in watch.backwards]
        assert_alive(system)
        same = {n: p.process.pid for n, p in system.processes.items()} == pids
        if not same:
            problems.append("a role was restarted")
        fk.record(f"broker paused (SIGSTOP) {S.broker_pause_s:.0f} s, then SIGCONT", 1,
                  ["every role recovers by itself (same pids, never exited)", "index = live items",
                   "every user with clicks has a vector", "no dead letter", "checkpoints never decrease"],
                  "nothing" if not problems else "; ".join(problems[:3]), "broker_paused",
                  stream=fk.user_counts(ledger))
        assert not problems, "\n".join(problems)


def broker_process(system: LocalSystem) -> int:
    assert system.broker is not None and system.broker.process is not None, "the test needs its own broker"
    return system.broker.process.pid


# --------------------------------------------------------------------------- join and leave
def test_second_trainer_and_publisher_join_then_leave(tmp_path: Path) -> None:
    ledger = fk.Ledger()
    parts = fk.chunks(fk.synthetic(S, SEED + 2), max(6, S.chunks // 4))
    join, leave = len(parts) // 3, 2 * len(parts) // 3
    with local_system(tmp_path, "join") as system, \
            watching(system.state_dir / "trainer" / "checkpoint.safetensors") as watch:
        checks = fk.Checks(system, ledger)
        for i, part in enumerate(parts):
            fk.produce_events(system, ledger, part)
            if i == join:
                system.add_role("trainer", name="trainer-2", state_dir=tmp_path / "trainer-2-state")
                system.add_role("publisher", name="publisher-2")
            if i == leave:
                assert_alive(system)
                system.processes["trainer-2"].stop()   # leaves cleanly (SIGTERM)
                system.processes["publisher-2"].kill()  # leaves by crashing (SIGKILL)
            time.sleep(S.chunk_pause_s)
        problems = converge(system, checks, S.converge_s)
        problems += checks.deadletters()[0]
        problems += [f"checkpoint went backwards: {a} -> {b}" for a, b in watch.backwards]
        assert_alive(system, list(fk.ROLES))
        fk.record("a second trainer and publisher join, then leave (SIGTERM / SIGKILL)", 2,
                  ["index = live items", "every user with clicks has a vector covering its newest click",
                   "no dead letter", "the first trainer's checkpoints never decrease"],
                  "nothing" if not problems else "; ".join(problems[:3]), "join",
                  stream=fk.user_counts(ledger))
        assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- full / read-only disk
def can_mount() -> bool:
    probe = Path("/tmp") / f"streamrecall-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok


@pytest.mark.skipif(not can_mount(), reason="needs `mount -t tmpfs` (root with CAP_SYS_ADMIN) to fill a real "
                                            "filesystem and remount it read-only")
def test_state_dir_full_then_read_only(tmp_path: Path) -> None:
    """Each role's state dir is its own small tmpfs: filled up (ENOSPC), then remounted
    read-only (EROFS). The role pauses with a clear error, the last snapshot stays loadable,
    and it resumes by itself when the disk is fixed."""
    from streamrecall.consumers.roles.indexer import snapshot as indexer_snapshot
    from streamrecall.model import ModelConfig, OnlineTrainer

    ledger = fk.Ledger()
    parts = fk.chunks(fk.synthetic(S, SEED + 3), 6)
    mounts: list[Path] = []

    def mount_state(system: LocalSystem) -> None:
        for role in ("trainer", "indexer"):
            d = system.state_dir / role
            d.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)], check=True)
            mounts.append(d)

    def loadable(system: LocalSystem) -> list[str]:
        problems = []
        try:
            OnlineTrainer(ModelConfig(**fk.MODEL)).restore(system.state_dir / "trainer" / "checkpoint.safetensors")
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            problems.append(f"trainer checkpoint unloadable: {exc}")
        try:
            if indexer_snapshot.load(system.state_dir / "indexer") is None:
                problems.append("no indexer snapshot")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"indexer snapshot unloadable: {exc}")
        return problems

    def errors_logged(system: LocalSystem, text: str) -> list[str]:
        return [f"{r} has not logged {text!r} yet" for r in ("trainer", "indexer")
                if text not in fk.log_tail(system, r, 200_000)]

    injected = 0
    problems: list[str] = []
    with ExitStack() as cleanup:
        cleanup.callback(lambda: [subprocess.run(["umount", "-l", str(m)]) for m in reversed(mounts)])
        with local_system(tmp_path, "disk", before_roles=mount_state) as system:
            checks = fk.Checks(system, ledger)
            fk.produce_events(system, ledger, parts[0])
            problems += fk.wait_until("first snapshots", lambda: loadable(system) + trainer_caught_up(system),
                                      S.converge_s)
            # 1. Full: a filler file takes every free byte of both tmpfs.
            for m in mounts:
                subprocess.run(["dd", "if=/dev/zero", f"of={m}/filler", "bs=1M"], capture_output=True)
            injected += 2
            fk.produce_events(system, ledger, parts[1] + parts[2])
            problems += fk.wait_until("ENOSPC", lambda: errors_logged(system, "No space left on device"), 90)
            problems += loadable(system)
            assert_alive(system)
            for m in mounts:
                (m / "filler").unlink()
            problems += fk.wait_until("resume after ENOSPC", lambda: trainer_caught_up(system), S.converge_s)
            # 2. Read-only: remount both.
            for m in mounts:
                subprocess.run(["mount", "-o", "remount,ro", str(m)], check=True)
            injected += 2
            fk.produce_events(system, ledger, parts[3] + parts[4])
            problems += fk.wait_until("EROFS", lambda: errors_logged(system, "Read-only file system"), 90)
            problems += loadable(system)
            assert_alive(system)
            for m in mounts:
                subprocess.run(["mount", "-o", "remount,rw", str(m)], check=True)
            fk.produce_events(system, ledger, parts[5])
            problems += fk.wait_until("resume after EROFS", lambda: trainer_caught_up(system), S.converge_s)
            # 3. A crash right after: the snapshots written after the fault restore.
            for role in ("trainer", "indexer"):
                system.processes[role].kill()
                system.processes[role].start()
            problems += converge(system, checks, S.converge_s)
            problems += checks.deadletters()[0]
            assert_alive(system)
            # The restarted roles log their restore once they have read it (the trainer ~5 s after
            # start on two busy cores): wait for the lines, bounded, rather than read them at once.
            problems += fk.wait_until("restore logged", lambda: [
                f"{role} did not log {text!r} after the disk faults"
                for role, text in (("trainer", "restored"), ("indexer", "snapshot loaded"))
                if text not in fk.log_tail(system, role, 200_000)], 60, every_s=0.5)
    fk.record("state dir full (ENOSPC) then read-only (EROFS), trainer and indexer (tmpfs mounts)", injected,
              ["a clear error logged, consumption paused, no role exited",
               "the last checkpoint/snapshot stays loadable during the fault",
               "resumes by itself when fixed; a SIGKILL after restores", "index = live items, users have vectors"],
              "nothing" if not problems else "; ".join(problems[:3]), "state_dir",
              stream=fk.user_counts(ledger))
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- forged model updates
SIGNING_KEY = "fault-suite-signing-key-0123456789"


def test_forged_model_updates_with_a_signing_key(tmp_path: Path) -> None:
    """Every role holds model_signing_key; forged updates (unsigned, one claiming version 10^18,
    signed with another key, tampered after signing) are mixed into model-updates, and the trainer
    is SIGKILLed once in the middle (its restart scans past the forged records). Each forged record
    is dead-lettered by the indexer (and the publisher where it reads it) with its reason; the
    replicas follow the genuine chain to its end; nothing else changes."""
    from streamrecall.model import ModelConfig, OnlineTrainer

    rng = random.Random(SEED + 4)
    ledger = fk.Ledger()
    parts = fk.chunks(fk.synthetic(S, SEED + 4), max(6, S.chunks // 4))

    def make_update(version: int) -> bytes:
        trainer = OnlineTrainer(ModelConfig(**fk.MODEL))
        trainer.advance_version(version - 1)
        return trainer.export_update(trainer_epoch=10**6)

    forged = fk.chunks(fk.forged_updates(rng, S.forged, SIGNING_KEY, make_update), len(parts))
    kill_at = len(parts) // 2
    with local_system(tmp_path, "forged", settings={"model_signing_key": SIGNING_KEY}) as system:
        checks = fk.Checks(system, ledger)
        for i, part in enumerate(parts):
            fk.produce_events(system, ledger, part)
            if i < len(forged):
                fk.produce_bad(system, ledger, [r for r, _ in forged[i]], [reason for _, reason in forged[i]])
            if i == kill_at:
                system.processes["trainer"].kill()
                system.processes["trainer"].start()
            time.sleep(S.chunk_pause_s)
        problems = converge(system, checks, S.converge_s)
        dl_problems, per_role = checks.deadletters()
        problems += dl_problems + checks.model_updates([])
        problems += fk.wait_until("replicas at the genuine version", lambda: genuine_version_applied(system),
                                  S.converge_s)
        assert_alive(system)
        fk.record("forged model updates with a signing key set (unsigned, other key, tampered, v10^18)",
                  len(ledger.bad) + 1,
                  [f"{len(ledger.bad)} forged updates: each dead-lettered by the indexer (and the publisher where "
                   "it reads it) as unsigned/bad-signature, once", "the trainer SIGKILLed once: its restart "
                   "resumes past the genuine versions only", "indexer and publisher reach the trainer's newest "
                   "version", "index = live items; every user with clicks has a vector", "no role exited"],
                  "nothing" if not problems else "; ".join(problems[:3]), "forged",
                  deadletters_per_role=dict(per_role), roles_alive=len(system.processes),
                  stream=fk.user_counts(ledger))
        assert not problems, "\n".join(problems)


def genuine_version_applied(system: LocalSystem) -> list[str]:
    """The indexer and the publisher hold the newest genuine (signed) version on model-updates."""
    from streamrecall.consumers.update_scan import last_published
    from streamrecall.consumers.clients import make_consumer
    from streamrecall.settings import Secret

    consumer = make_consumer(system.settings, None)
    try:
        newest = last_published(consumer, system.settings.topics.model_updates, Secret(SIGNING_KEY)).version
    finally:
        consumer.close(autocommit=False)
    _, health = system.get("/healthz")
    versions = {"indexer": health.get("model_version") if isinstance(health, dict) else None,
                "publisher": system.metric("streamrecall_model_version", "publisher", role="publisher")}
    return [f"{role} at v{v}, the genuine chain is at v{newest}" for role, v in versions.items()
            if v is None or int(v) != newest]


# --------------------------------------------------------------------------- SIGKILL of `up`
def test_sigkill_of_up_leaves_no_orphans(tmp_path: Path) -> None:
    """`streamrecall up` (embedded broker, three roles, live stream) SIGKILLed while running: its
    broker and every role are gone within 5 s; also when SIGTERM came a moment before (a service
    manager's stop)."""
    gone_s: list[float] = []
    orphans: list[str] = []
    children = 0
    for i in range(S.up_kills):
        up, pids = start_up(tmp_path / f"up-{i}", rate=50)
        children += len(pids)
        try:
            time.sleep(3.0 + i)  # the roles are starting, then running
            if i % 2 == 1:
                up.send_signal(signal.SIGTERM)
                time.sleep(1.0)
            killed = time.monotonic()
            up.kill()
            up.wait(timeout=10)
            while any(pid_running(p) for p in pids.values()) and time.monotonic() - killed < 5:
                time.sleep(0.05)
            gone_s.append(time.monotonic() - killed)
            orphans += [f"{name} (pid {p})" for name, p in pids.items() if pid_running(p)]
        finally:
            for pid in pids.values():  # only what this test started
                if pid_running(pid):
                    os.kill(pid, signal.SIGKILL)
    problems = [f"orphans after up was killed: {orphans}"] if orphans else []
    fk.record("SIGKILL of `streamrecall up` (every other time after a SIGTERM)", S.up_kills,
              [f"{children} children (broker + three roles per run) gone within 5 s "
               f"(worst {max(gone_s):.2f} s)", "no orphan left"],
              "nothing" if not problems else "; ".join(problems[:3]), "sigkill_of_up", roles_alive=0)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- unreachable broker
def test_unreachable_broker_at_start(tmp_path: Path) -> None:
    """Every entry point started against a broker that does not answer exits non-zero within the
    bootstrap timeout with one line that says what to do, and no traceback."""
    from streamrecall.devtools.broker import free_port

    port = free_port()  # nothing listens there
    commands = [["run", role] for role in fk.ROLES] + [["topics", "create"], ["status"],
                                                       ["up", "--duration", "5"]]
    problems = []
    worst = 0.0
    for args in commands:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "streamrecall", *args, "--bootstrap-servers",
                                 f"127.0.0.1:{port}", "--bootstrap-timeout-ms", "2000", "--state-dir",
                                 str(tmp_path / "state")], capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        worst = max(worst, took)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        if result.returncode == 0 or "Traceback" in result.stderr or len(errors) != 1 or \
                "127.0.0.1:%d" % port not in errors[0] or took > 60:
            problems.append(f"{' '.join(args)}: exit {result.returncode} in {took:.0f}s, stderr "
                            f"{result.stderr[-500:]!r}")
    fk.record("unreachable broker at start (every role, topics create, status, up)", len(commands),
              [f"each exits non-zero with one `error:` line naming the broker, no traceback (worst {worst:.1f} s "
               "with a 2 s bootstrap timeout)"],
              "nothing" if not problems else "; ".join(problems[:3]), "unreachable", roles_alive=0)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- items without content
def test_items_without_content_are_valid_input(tmp_path: Path) -> None:
    ledger = fk.Ledger()
    groups = fk.hostile_valid(random.Random(SEED), 80, fk.TS0, content={})
    with local_system(tmp_path, "bare") as system:
        checks = fk.Checks(system, ledger)
        for group in groups:
            ledger.valid_odd += len(group)
            fk.produce_events(system, ledger, group)
        problems = converge(system, checks, 90)
        problems += checks.deadletters()[0]
        assert_alive(system)
    assert not problems, "\n".join(problems)
