"""A big full update is decoded and staged off the reader's loop, then applied whole.

Without a broker: ModelUpdateStream with a real TowerReplica's ``prepare``, ``stage_min_bytes`` 1 so
that every full update of the small model is staged. The integration side (the publisher and the
indexer on a real broker) is in tests/integration/test_chunked_updates.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from streamrecall.consumers.deadletter import DeadLetter
from streamrecall.consumers.update_chunks import read_chunk, split_update
from streamrecall.consumers.update_codec import sign_update
from streamrecall.consumers.updates import ModelUpdateStream
from streamrecall.events import Click, Item
from streamrecall.model import ItemCatalog, ModelConfig, ModelUpdate, OnlineTrainer, RecentHistory, TowerReplica
from streamrecall.model.update import decode_update
from streamrecall.settings import Secret

KEY = Secret("staging-signing-key-0123456789")
CONFIG = ModelConfig(dim=8, hidden=8, id_buckets=64, token_buckets=64, estimator_buckets=64, tower="two_tower")
CHUNK = 1024

Record = tuple[bytes, list[tuple[str, bytes]]]


CATALOG = ItemCatalog()
for _n in range(11):
    CATALOG.upsert(Item(item_id=f"i{_n}", created_at=1, categories=(f"c{_n % 3}",), title=f"item {_n}"))


def train(trainer: OnlineTrainer, steps: int = 3) -> None:
    """A few steps on clicks of five users: rows of every table and the dense layers move."""
    history = RecentHistory(CONFIG.history_len)
    for s in range(steps):
        clicks = [Click(user_id=f"u{(s * 7 + i) % 5}", item_id=f"i{(s * 3 + i) % 11}", ts=1_000 + i) for i in range(8)]
        trainer.step(trainer.make_batch(clicks, CATALOG, history.before_each(clicks)))


def export(trainer: OnlineTrainer, full: bool = False, key: Secret = KEY) -> list[Record]:
    data = trainer.export_update(full=full, trainer_epoch=1)
    kind = "full" if full or trainer.version == 1 else "delta"
    return split_update(data, kind, trainer.version, 1, CHUNK, sign_update(key, data))


class Staged:
    """A stream staging every full update for ``replica``; ``gate`` holds the worker until set."""

    def __init__(self, replica: TowerReplica, max_bytes: int = 1 << 20) -> None:
        self.replica = replica
        self.applied: list[tuple[int, int]] = []
        self.letters: list[DeadLetter] = []
        self.gate = threading.Event()
        self.gate.set()
        self.stream = ModelUpdateStream("mu", self._apply, self.letters.append, max_bytes=max_bytes,
                                        signing_key=KEY, prepare=self._prepare, stage_min_bytes=1)
        self.offset = 0
        self.fed: list[Record] = []

    def _prepare(self, update: ModelUpdate) -> None:
        assert self.gate.wait(10)
        self.replica.prepare(update)

    def _apply(self, update: ModelUpdate, offset: int) -> None:
        if self.replica.apply(update).status == "applied":
            self.applied.append((update.version, offset))

    def feed(self, recs: list[Record]) -> int:
        """Add ``recs``; the offset of the first."""
        first = self.offset
        self.fed += recs
        for value, headers in recs:
            self.stream.add(self.offset, read_chunk(value, headers))
            self.offset += 1
        return first


def tables(replica: TowerReplica) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in replica.model.state_dict().items()}


def user_vectors(replica: TowerReplica) -> torch.Tensor:
    return torch.from_numpy(replica.encode_users(["u1", "u3"], [["i1"], ["i2", "i5"]]))


def test_the_loop_goes_on_while_a_full_update_stages_and_the_replica_serves_the_version_before() -> None:
    trainer = OnlineTrainer(CONFIG)
    s = Staged(TowerReplica(CONFIG))
    s.feed(export(trainer))  # v1, the first export: full
    s.stream.pump(wait=True)
    train(trainer)
    v2 = s.feed(export(trainer))  # a delta: applied at once
    assert s.applied == [(1, 0), (2, v2)] and not s.stream.staging
    before, vectors = tables(s.replica), user_vectors(s.replica)

    train(trainer)
    s.gate.clear()  # the worker cannot finish staging v3
    started = time.perf_counter()
    v3 = s.feed(export(trainer, full=True))
    assert time.perf_counter() - started < 5, "add() returned while the update was staging"
    train(trainer)
    s.feed(export(trainer))  # v4, a delta behind it: held
    s.stream.pump()
    assert s.stream.staging and s.applied[-1][0] == 2, "nothing applied while v3 stages"
    assert s.replica.version == 2 and torch.equal(user_vectors(s.replica), vectors)
    assert all(torch.equal(v, before[k]) for k, v in tables(s.replica).items()), "the replica serves v2, whole"
    assert s.stream.resume_offset(s.offset) == v3, "a restart re-reads v3 and what was held behind it"

    s.gate.set()
    deadline = time.monotonic() + 10
    while s.stream.staging and time.monotonic() < deadline:
        s.stream.pump()
        time.sleep(0.01)
    assert [v for v, _ in s.applied] == [1, 2, 3, 4] and s.applied[2][1] == v3 and not s.letters
    assert s.stream.resume_offset(s.offset) == s.offset

    reference = TowerReplica(CONFIG)  # the same records applied in the loop, as before staging existed
    plain = ModelUpdateStream("mu", lambda update, _: reference.apply(update), s.letters.append,
                              max_bytes=1 << 20, signing_key=KEY)
    for offset, (value, headers) in enumerate(s.fed):
        plain.add(offset, read_chunk(value, headers))
    assert reference.version == 4 and not s.letters
    assert all(torch.equal(v, tables(reference)[k]) for k, v in tables(s.replica).items())


def test_a_staged_update_that_does_not_verify_is_dead_lettered_once_and_the_next_one_applies() -> None:
    trainer = OnlineTrainer(CONFIG)
    s = Staged(TowerReplica(CONFIG))
    forged = s.feed(export(trainer, key=Secret("another-key-0123456789abcdef")))
    train(trainer)
    s.feed(export(trainer))  # a delta on the refused v1: a gap, skipped
    s.stream.pump(wait=True)
    assert [(d.offset, d.reason) for d in s.letters] == [(forged, "bad-signature")]
    good = s.feed(export(trainer, full=True))
    s.stream.pump(wait=True)
    assert s.applied == [(3, good)] and len(s.letters) == 1 and s.replica.version == 3


def test_records_held_behind_a_staging_update_stay_bounded_by_waiting_for_it() -> None:
    trainer = OnlineTrainer(CONFIG)
    updates = [export(trainer)]
    for _ in range(2):
        train(trainer)
        updates.append(export(trainer, full=True))
    biggest = max(sum(len(v) for v, _ in recs) for recs in updates)
    s = Staged(TowerReplica(CONFIG), max_bytes=biggest * 3 // 2)  # two updates held pass it
    s.gate.clear()
    threading.Timer(0.3, s.gate.set).start()
    s.feed(updates[0])
    s.feed(updates[1])
    assert s.applied == [], "v1 stages, v2 is held"
    s.feed(updates[2])  # held past max_bytes: add() waits for v1, and v2 staged after it; v3 then stages
    assert [v for v, _ in s.applied] == [1, 2] and s.stream.staging
    s.stream.pump(wait=True)
    assert [v for v, _ in s.applied] == [1, 2, 3] and not s.letters


@pytest.mark.parametrize("between", [False, True])
def test_apply_after_prepare_is_the_same_as_apply_and_restages_if_the_replica_moved(between: bool) -> None:
    trainer = OnlineTrainer(CONFIG)
    staged, plain = TowerReplica(CONFIG), TowerReplica(CONFIG)
    v1 = decode_update(trainer.export_update(trainer_epoch=1))
    train(trainer)
    v2 = decode_update(trainer.export_update(trainer_epoch=1))
    train(trainer)
    v3 = decode_update(trainer.export_update(full=True, trainer_epoch=1))
    plain.apply(v1), plain.apply(v2)
    expected = plain.apply(v3)
    staged.apply(v1)
    if between:
        staged.prepare(v3)  # staged against v1 ...
        staged.apply(v2)    # ... then the replica moved: the staged rows are stale
    else:
        staged.apply(v2)
        staged.prepare(v3)
        assert staged.version == 2, "prepare changes nothing the replica serves"
    got = staged.apply(v3)
    assert (got.status, got.version, got.reencode_all) == (expected.status, expected.version, expected.reencode_all)
    assert all(torch.equal(v, tables(plain)[k]) for k, v in tables(staged).items())
    for name in (got.changed.rows if got.changed else {}):
        assert torch.equal(got.changed.rows[name], expected.changed.rows[name])
