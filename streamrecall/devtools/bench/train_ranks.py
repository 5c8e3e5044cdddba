"""`streamrecall bench train --ranks N`: clicks/s of a data-parallel trainer job of N ranks.

N processes on this machine join over gloo on loopback and take collective steps
(:class:`~streamrecall.model.data_parallel.DataParallelTrainer`) on the same global batches
that ``bench train`` times in one process (its ``end_to_end`` figure: make_batch + step, the
featurisation cache warm, here too), each rank featurising and training its contiguous share of
every batch. Reported: global clicks/s
(rank 0's wall time over the timed steps, between barriers) and the bytes each rank sent per
step. Run a worker by hand with ``python -m streamrecall.devtools.bench.train_ranks``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankRun:
    """What one job measured: global clicks/s and bytes sent per step per rank (their mean)."""

    world_size: int
    clicks_per_s: float
    sent_bytes_per_step: float


def measure(world_size: int, *, batch_size: int, steps: int, warmup: int, n_items: int, id_buckets: int,
            threads: int, timeout_s: float = 600.0) -> RankRun:
    """Start the job's ranks as processes, wait for them, read rank 0's figures."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(a) for a in (world_size, port, batch_size, steps, warmup, n_items, id_buckets, threads)]
    procs = [subprocess.Popen([sys.executable, "-m", __name__, str(r), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world_size)]
    outputs = [p.communicate(timeout=timeout_s) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"a bench rank failed ({p.returncode}):\n{err[-3000:]}")
    sent = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    return RankRun(world_size, sent[0]["clicks_per_s"],
                   sum(s["sent_bytes_per_step"] for s in sent) / len(sent))


def _worker(rank: int, world: int, port: int, batch_size: int, steps: int, warmup: int, n_items: int,
            id_buckets: int, threads: int) -> dict[str, float]:
    from streamrecall.devtools.bench.train import _stream
    from streamrecall.model import ModelConfig, RecentHistory
    from streamrecall.model.data_parallel import Collective, DataParallelTrainer

    torch.set_num_threads(threads)
    catalog, clicks = _stream(n_items, (steps + warmup) * batch_size)
    comm = Collective.join(rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port, timeout_s=300)
    try:
        trainer = DataParallelTrainer(ModelConfig(id_buckets=id_buckets), comm)
        history = RecentHistory(trainer.config.history_len)
        share = -(-batch_size // world)

        def one(k: int) -> int:
            batch = clicks[k * batch_size:(k + 1) * batch_size]
            return trainer.global_step(batch[rank * share:(rank + 1) * share], catalog, history).comm_bytes

        # Featurisation cache warm, as in bench train's end_to_end (and a long-running trainer).
        for k in range(warmup + steps):
            trainer.make_batch(clicks[k * batch_size:(k + 1) * batch_size], catalog,
                               [[] for _ in range(batch_size)])
        for k in range(warmup):
            one(k)
        dist.barrier()
        started = time.perf_counter()
        sent = sum(one(k) for k in range(warmup, warmup + steps))
        dist.barrier()
        took = time.perf_counter() - started
    finally:
        comm.close()
    return {"clicks_per_s": steps * batch_size / took, "sent_bytes_per_step": sent / steps}


if __name__ == "__main__":
    print(json.dumps(_worker(*(int(a) for a in sys.argv[1:]))))
    sys.stdout.flush()
