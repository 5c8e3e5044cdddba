"""`streamrecall bench train`: online training throughput of the two towers.

Shapes: batch 1024, dim 64, 1M-bucket id tables, history 20 (the defaults). Three
figures, measured in the same run on the same machine:

- ``raw``: the same towers and loss on the same batches in a plain torch loop (torch's
  sparse SGD on the tables, Adam on the dense layers, a fixed log q);
- ``step``: :meth:`OnlineTrainer.step` on pre-built batches (estimator, logQ loss,
  towers, row-wise Adagrad + Adam, change tracking);
- ``end_to_end``: :meth:`OnlineTrainer.make_batch` from click objects and the item
  table, plus ``step`` (featurisation cache warm, as in a long-running trainer).
"""

from __future__ import annotations

import math
import time

import click
import msgspec
import torch

from streamrecall.devtools.bench import json_option, peak_rss_mb, report, result
from streamrecall.events import Click, Item
from streamrecall.model import ItemCatalog, ModelConfig, OnlineTrainer, RecentHistory
from streamrecall.model.batch import TrainBatch
from streamrecall.model.loss import sampled_softmax_loss
from streamrecall.model.towers import build_model
from streamrecall.devtools.synthetic import SyntheticConfig, generate


def _stream(n_items: int, n_clicks: int) -> tuple[ItemCatalog, list[Click]]:
    catalog, clicks = ItemCatalog(), []
    syn = SyntheticConfig(n_items=n_items, n_users=max(n_items // 2, 1), n_clicks=n_clicks, new_item_share=0.0)
    for topic, _, value in generate(syn):
        if topic == "items":
            catalog.upsert(msgspec.convert(value, Item))
        else:
            clicks.append(msgspec.convert(value, Click))
    return catalog, clicks


def _raw_examples_per_s(config: ModelConfig, batches: list[TrainBatch], warmup: int) -> float:
    """The same work in a plain torch loop: the same model (``build_model(config)``: the towers or the FM) and the
    same loss on the same pre-built batches, each step forward → logQ-corrected in-batch softmax
    → backward → torch's sparse SGD on the tables and Adam on the dense layers. What it leaves
    out is what the trainer adds: the streaming estimator (the correction here is one fixed
    per-column log q), trending, down-sampling, row-wise Adagrad state and change tracking."""
    model = build_model(config)
    sparse_opt = torch.optim.SGD(list(model.tables().values()), lr=config.lr_sparse)
    dense = list(model.dense().values())  # the FM has none
    dense_opt = torch.optim.Adam(dense, lr=config.lr_dense) if dense else None
    log_q = [torch.full((len(b),), -math.log(len(b))) for b in batches]

    def one(k: int) -> None:
        b = batches[k]
        loss = sampled_softmax_loss(model.user(b.users), model.item(b.items), temperature=config.softmax_temperature,
                                    item_keys=b.items.keys, log_q=log_q[k], weights=b.weights)
        sparse_opt.zero_grad()
        if dense_opt is not None:
            dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        sparse_opt.step()
        if dense_opt is not None:
            dense_opt.step()

    for k in range(warmup):
        one(k)
    t = time.perf_counter()
    for k in range(warmup, len(batches)):
        one(k)
    return sum(len(b) for b in batches[warmup:]) / (time.perf_counter() - t)


def _rate(one, inputs, warmup: int, batch_size: int, catalog=None) -> float:
    """Examples/s of ``one`` over ``inputs`` after ``warmup`` untimed calls."""
    if catalog is not None:
        inputs = [(c, catalog, h) for c, h in inputs]
    for x in inputs[:warmup]:
        one(x)
    t = time.perf_counter()
    for x in inputs[warmup:]:
        one(x)
    return len(inputs[warmup:]) * batch_size / (time.perf_counter() - t)


@click.command("train")
@click.option("--batch-size", default=1024, show_default=True)
@click.option("--steps", default=40, show_default=True, help="Timed steps per figure.")
@click.option("--warmup", default=5, show_default=True)
@click.option("--items", "n_items", default=100_000, show_default=True, help="Synthetic catalog size.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved rounds; the best of each is kept.")
@click.option("--threads", default=1, show_default=True,
              help="torch intra-op threads (1, as the roles' torch_threads default: more spin on a shared machine).")
@click.option("--id-buckets", default=ModelConfig.id_buckets, show_default=True, help="Rows of each id table.")
@json_option
def command(batch_size: int, steps: int, warmup: int, n_items: int, rounds: int, threads: int, id_buckets: int,
            as_json: bool) -> None:
    """Examples/s of the online trainer vs a raw torch step of the same shapes."""
    torch.set_num_threads(threads)
    config = ModelConfig(id_buckets=id_buckets)
    catalog, clicks = _stream(n_items, (steps + warmup) * batch_size)
    history = RecentHistory(config.history_len)
    chunks = [clicks[i:i + batch_size] for i in range(0, len(clicks), batch_size)]
    histories = [history.before_each(c) for c in chunks]

    # Interleaved rounds, best of each: the machine is shared, and the best round is the
    # least disturbed estimate of each figure.
    trainer = OnlineTrainer(config)
    batches = [trainer.make_batch(c, catalog, h) for c, h in zip(chunks, histories)]
    raw = step_rate = e2e_rate = 0.0
    for _ in range(rounds):
        raw = max(raw, _raw_examples_per_s(config, batches, warmup))
        step_rate = max(step_rate, _rate(lambda b: trainer.step(b), batches, warmup, batch_size))
        # Warm featurisation cache (these items were seen), as in a long-running trainer.
        pairs = list(zip(chunks, histories))
        e2e_rate = max(e2e_rate, _rate(lambda ch: trainer.step(trainer.make_batch(*ch)), pairs, warmup,
                                       batch_size, catalog=catalog))

    shape = (f"batch={batch_size} dim={config.dim} id_buckets={config.id_buckets} threads={threads} "
             f"best of {rounds}")
    report([
        result("train/raw_torch_step", "examples/s", raw, extra=f"the same model and loss, plain torch loop; {shape}"),
        result("train/step", "examples/s", step_rate, ratio_to_raw=step_rate / raw, extra=shape),
        result("train/end_to_end", "examples/s", e2e_rate, ratio_to_raw=e2e_rate / raw,
               extra=f"make_batch + step; {shape}"),
        result("train/peak_rss", "MiB", peak_rss_mb()),
    ], as_json)
