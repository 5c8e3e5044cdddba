"""One rank of a data-parallel training run over a seeded stream (tests/model/test_model_data_parallel.py).

    python data_parallel_worker.py RANK WORLD_SIZE PORT OUT_DIR [TOWER,...]

Every rank builds the same catalog and clicks; step k's global batch is clicks [k·B, (k+1)·B),
split unevenly among the ranks (an empty share at some steps), each rank training only its share.
It writes its replicated state (tables, estimator, trending, histories) to OUT_DIR/TOWER-rank{R}.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from streamrecall.devtools.bench.train import _stream
from streamrecall.events import Click
from streamrecall.model import ItemCatalog, ModelConfig, RecentHistory
from streamrecall.model.data_parallel import Collective, DataParallelTrainer
from streamrecall.model.safeio import dumps

CONFIG = dict(dim=8, hidden=16, id_buckets=2_000, token_buckets=1_024, estimator_buckets=1 << 12,
              trending_size=20, history_len=5)
BATCH = 64
STEPS = 12


def stream() -> tuple[ItemCatalog, list[Click]]:
    """The seeded catalog and clicks every rank (and the one-process reference) builds."""
    return _stream(300, BATCH * STEPS)


def shares(batch: list, step: int, world: int) -> list[list]:
    """Uneven contiguous shares; rank 1 of 2 gets nothing every fourth step."""
    if world == 1:
        return [batch]
    cut = len(batch) if step % 4 == 3 else (len(batch) // 3 if step % 2 else len(batch) * 2 // 3)
    return [batch[:cut], batch[cut:]]


def state(trainer, history: RecentHistory) -> tuple[dict, dict]:
    tensors = {f"table/{k}": v.detach().clone() for k, v in trainer.model.tables().items()}
    tensors |= {f"dense/{k}": v.detach().clone() for k, v in trainer.model.dense().items()}
    tensors |= {f"estimator/{k}": v for k, v in trainer.estimator.state().items()}
    return tensors, {"trending": trainer.trending.top(), "history": history.to_json(), "steps": trainer.steps}


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    towers = sys.argv[5].split(",") if len(sys.argv) > 5 else ["fm"]
    torch.set_num_threads(1)
    comm = Collective.join(rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port, timeout_s=60)
    try:
        catalog, clicks = stream()
        for tower in towers:  # one job per model family, one after the other in the same processes
            trainer = DataParallelTrainer(ModelConfig(**CONFIG, tower=tower), comm)
            history = RecentHistory(trainer.config.history_len)
            for k in range(STEPS):
                trainer.global_step(shares(clicks[k * BATCH:(k + 1) * BATCH], k, world)[rank], catalog, history)
            tensors, header = state(trainer, history)
            (out / f"{tower}-rank{rank}.safetensors").write_bytes(dumps(tensors, header))
    finally:
        comm.close()


if __name__ == "__main__":
    main()
