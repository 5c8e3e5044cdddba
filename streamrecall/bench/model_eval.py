"""`streamrecall bench model-eval`: one-pass HR@K of the towers on the synthetic stream.

Progressive (prequential) validation: the stream is read once, in order; every
``eval_every``-th micro-batch is first scored — each click's user is encoded with the
current towers and the top K items are retrieved by exact search over the catalog as it
stands — and only then trained on. Peers, fed identical batches:

- ``most_popular``: the K items with most clicks so far (alive in the catalog);
- ``uncorrected``: the towers trained without the logQ correction;
- ``logq``: the towers trained with it (the default model);
- ``logq_mixed`` (with ``--mixed-negatives N``): logQ plus N uniform negatives per batch.

``tail`` restricts the clicks scored to items outside the 10% most clicked items of the
whole stream.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import click
import msgspec
import numpy as np
import torch

from streamrecall.bench import json_option, report, result
from streamrecall.events import Click, Item
from streamrecall.model import ItemCatalog, ModelConfig, OnlineTrainer, RecentHistory
from streamrecall.synthetic import SyntheticConfig, generate


@dataclass
class _Score:
    hits: int = 0
    scored: int = 0
    tail_hits: int = 0
    tail_scored: int = 0

    def add(self, hit: np.ndarray, tail: np.ndarray) -> None:
        self.hits += int(hit.sum())
        self.scored += len(hit)
        self.tail_hits += int(hit[tail].sum())
        self.tail_scored += int(tail.sum())

    def as_dict(self) -> dict[str, float]:
        return {"hr": self.hits / max(self.scored, 1), "tail_hr": self.tail_hits / max(self.tail_scored, 1),
                "scored": self.scored, "tail_scored": self.tail_scored}


@dataclass
class EvalResult:
    peers: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    train_examples_per_s: float = 0.0


def evaluate_stream(syn: SyntheticConfig, models: dict[str, ModelConfig], *, batch_size: int = 1024,
                    k: int = 50, eval_every: int = 5, warmup_batches: int = 20) -> EvalResult:
    """Train each model config in one pass over ``syn`` and score HR@k prequentially."""
    events = list(generate(syn))
    totals = Counter(v["item_id"] for t, _, v in events if t == "clicks")
    head_n = max(1, len(totals) // 10)
    head = {i for i, _ in totals.most_common(head_n)}
    trainers = {name: OnlineTrainer(cfg) for name, cfg in models.items()}
    scores = {name: _Score() for name in ["most_popular", *models]}
    catalog, history, counts = ItemCatalog(), RecentHistory(max(c.history_len for c in models.values())), Counter()
    first = next(iter(trainers.values()))
    buffer: list[Click] = []
    n_batches, train_s, trained = 0, 0.0, 0
    started = time.perf_counter()

    def flush() -> None:
        nonlocal n_batches, train_s, trained
        histories = history.before_each(buffer)
        batch = first.make_batch(buffer, catalog, histories)
        if n_batches >= warmup_batches and n_batches % eval_every == 0 and len(catalog) >= k:
            _score_batch(buffer, histories, batch, catalog, counts, head, trainers, scores, k)
        t = time.perf_counter()
        for trainer in trainers.values():
            # The shared batch has no sampled negatives; a mixed-negatives model draws its own.
            trainer.step(trainer.make_batch(buffer, catalog, histories) if trainer.config.mixed_negatives else batch)
        train_s += time.perf_counter() - t
        trained += len(buffer) * len(trainers)
        counts.update(c.item_id for c in buffer)
        n_batches += 1
        buffer.clear()

    for topic, _, value in events:
        if topic == "items":
            item = msgspec.convert(value, Item)
            if item.deleted:
                catalog.delete(item.item_id)
            else:
                catalog.upsert(item)
            continue
        buffer.append(msgspec.convert(value, Click))
        if len(buffer) == batch_size:
            flush()
    if buffer:
        flush()
    return EvalResult({n: s.as_dict() for n, s in scores.items()}, time.perf_counter() - started,
                      trained / max(train_s, 1e-9))


@torch.no_grad()
def _score_batch(clicks, histories, batch, catalog, counts, head, trainers, scores, k) -> None:
    ids = list(catalog.keys())
    items = [catalog[i] for i in ids]
    clicked = np.array([c.item_id for c in clicks])
    tail = np.array([c.item_id not in head for c in clicks])
    popular = {i for i, _ in _top_alive(counts, catalog, k)}
    scores["most_popular"].add(np.array([i in popular for i in clicked]), tail)
    id_arr = np.array(ids)
    for name, trainer in trainers.items():
        model = trainer.model
        item_vecs = model.item(trainer.featurizer.encode_items(items))
        user_vecs = model.user(trainer.featurizer.users([c.user_id for c in clicks], histories))
        top = torch.topk(user_vecs @ item_vecs.T, k, dim=1).indices.numpy()
        retrieved = id_arr[top]
        scores[name].add((retrieved == clicked[:, None]).any(axis=1), tail)


def _top_alive(counts: Counter, catalog: ItemCatalog, k: int) -> list[tuple[str, int]]:
    out = []
    for item_id, n in counts.most_common():
        if item_id in catalog:
            out.append((item_id, n))
            if len(out) == k:
                break
    return out


@click.command("model-eval")
@click.option("--items", "n_items", default=20_000, show_default=True, help="Catalog size.")
@click.option("--users", "n_users", default=10_000, show_default=True)
@click.option("--clicks", "n_clicks", default=300_000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=1024, show_default=True)
@click.option("-k", "k", default=50, show_default=True)
@click.option("--eval-every", default=5, show_default=True, help="Score every Nth batch before training on it.")
@click.option("--id-buckets", default=ModelConfig.id_buckets, show_default=True)
@click.option("--mixed-negatives", default=0, show_default=True,
              help="If > 0, add a peer 'logq_mixed' with this many uniform negatives per batch.")
@click.option("--downsample-top", type=float, default=None, envvar="STREAMRECALL_BENCH_DOWNSAMPLE_TOP",
              show_envvar=True, help="downsample_top of the logQ peers (default: the ModelConfig default).")
@click.option("--logq-alpha", type=float, default=None, envvar="STREAMRECALL_BENCH_LOGQ_ALPHA",
              show_envvar=True, help="logq_alpha of the logQ peers (default: the ModelConfig default).")
@click.option("--estimator-prior-gaps", type=float, default=None, envvar="STREAMRECALL_BENCH_ESTIMATOR_PRIOR_GAPS",
              show_envvar=True, help="estimator_prior_gaps of the logQ peers (default: the ModelConfig default).")
@json_option
def command(n_items: int, n_users: int, n_clicks: int, seed: int, batch_size: int, k: int, eval_every: int,
            id_buckets: int, mixed_negatives: int, downsample_top: float | None, logq_alpha: float | None,
            estimator_prior_gaps: float | None, as_json: bool) -> None:
    """HR@K of most-popular, uncorrected and logQ-corrected towers, trained online in one pass.

    The model options (--downsample-top and the like) apply to the logQ peers only, so one run
    compares a lever against the same stream's most-popular and uncorrected figures.
    """
    torch.manual_seed(seed)
    syn = SyntheticConfig(n_items=n_items, n_users=n_users, n_clicks=n_clicks, seed=seed)
    base = ModelConfig(id_buckets=id_buckets, seed=seed)
    levers = {name: value for name, value in (("downsample_top", downsample_top), ("logq_alpha", logq_alpha),
                                              ("estimator_prior_gaps", estimator_prior_gaps)) if value is not None}
    models = {"uncorrected": base.replace(logq=False), "logq": base.replace(**levers)}
    if mixed_negatives:
        models["logq_mixed"] = base.replace(mixed_negatives=mixed_negatives, **levers)
    res = evaluate_stream(syn, models, batch_size=batch_size, k=k, eval_every=eval_every)
    rows = []
    for name, s in res.peers.items():
        extra = f"scored={s['scored']} tail_scored={s['tail_scored']}"
        rows.append(result(f"model_eval/hr_at_{k}/{name}", "ratio", s["hr"], extra=extra))
        rows.append(result(f"model_eval/tail_hr_at_{k}/{name}", "ratio", s["tail_hr"], extra=extra))
    rows.append(result("model_eval/train_examples_per_s", "examples/s", res.train_examples_per_s,
                       extra=f"per model, {len(res.peers) - 1} models; total {res.seconds:.0f} s"))
    report(rows, as_json)
