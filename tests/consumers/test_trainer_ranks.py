"""A data-parallel trainer rank's handler without Kafka or peers: which partitions, who publishes,
what is committed (the collective rounds themselves run in tests/integration/test_trainer_ranks.py)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.roles.trainer.metrics import TrainerMetrics
from streamrecall.consumers.roles.trainer.options import TrainerOptions
from streamrecall.consumers.roles.trainer.ranks import NoUpdates, RankedTrainerHandler, rank_partitions
from streamrecall.model import ItemCatalog, ModelConfig
from streamrecall.model.data_parallel import Collective, DataParallelTrainer

CONFIG = ModelConfig(dim=8, hidden=16, id_buckets=1024, token_buckets=1024, estimator_buckets=1024)


def handler(tmp_path, rank: int, world: int = 2) -> RankedTrainerHandler:
    trainer = DataParallelTrainer(CONFIG, Collective(rank, world))  # no process group: no collective is made
    return RankedTrainerHandler(trainer, ItemCatalog(), NoUpdates(), tmp_path / "ckpt", "clicks", [0, 1, 2, 3],
                                TrainerOptions(batch_size=10), TrainerMetrics(CollectorRegistry()),
                                own=rank_partitions([0, 1, 2, 3], rank, world))


def test_each_rank_reads_a_disjoint_share_of_the_partitions():
    shares = [rank_partitions(list(range(7)), r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(p for s in shares for p in s) == list(range(7))


def test_only_rank_0_publishes(tmp_path):
    h = handler(tmp_path, 1)
    with pytest.raises(RuntimeError, match="only rank 0"):
        h.publish()
    with pytest.raises(RuntimeError, match="only rank 0"):
        NoUpdates().send(b"", "full", 1)
    assert h.share == 5  # ceil(batch_size / world_size)


def test_a_rank_commits_only_offsets_of_steps_rank_0_published(tmp_path):
    h = handler(tmp_path, 1)
    assert h.start_offsets() == Offsets({("clicks", 1): 0, ("clicks", 3): 0})
    # Rounds recorded (trainer steps after the round, safe offsets); rank 0 said it published step 3.
    h._trained.extend([(2, {1: 10, 3: 4}), (3, {1: 20, 3: 4}), (5, {1: 30, 3: 9})])
    h._published_steps = 3
    assert h.flush(Offsets()) == Offsets({("clicks", 1): 20, ("clicks", 3): 4})
    assert h.flush(Offsets()) == Offsets({("clicks", 1): 20, ("clicks", 3): 4})  # nothing newer yet
    h._published_steps = 5
    assert h.flush(Offsets()) == Offsets({("clicks", 1): 30, ("clicks", 3): 9})
