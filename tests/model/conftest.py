"""Small-model fixtures for the learning core (tables of thousands of rows, not millions)."""

from __future__ import annotations

from typing import Callable

from collections import Counter

import msgspec
import pytest
import torch

from streamrecall.events import Click, Item
from streamrecall.model import ItemCatalog, ModelConfig, OnlineTrainer, RecentHistory
from streamrecall.model.sparse_optim import SparseRowOptimizer
from streamrecall.devtools.synthetic import SyntheticConfig, generate

torch.set_num_threads(1)


@pytest.fixture
def small_config() -> Callable[..., ModelConfig]:
    def make(**changes) -> ModelConfig:
        base = dict(dim=16, hidden=32, id_buckets=5_000, token_buckets=4_096, estimator_buckets=1 << 14,
                    trending_size=20)
        return ModelConfig(**(base | changes))
    return make


@pytest.fixture
def stream() -> Callable[..., tuple[ItemCatalog, list[Click]]]:
    """A synthetic catalog (all items) and its clicks, as event objects."""
    def make(**changes) -> tuple[ItemCatalog, list[Click]]:
        syn = SyntheticConfig(**(dict(n_items=500, n_users=200, n_clicks=4_096) | changes))
        catalog, clicks = ItemCatalog(), []
        for topic, _, value in generate(syn):
            if topic == "items":
                item = msgspec.convert(value, Item)
                catalog.delete(item.item_id) if item.deleted else catalog.upsert(item)
            else:
                clicks.append(msgspec.convert(value, Click))
        return catalog, clicks
    return make


def _train(trainer: OnlineTrainer, catalog: ItemCatalog, clicks: list[Click], history: RecentHistory) -> None:
    for i in range(0, len(clicks), 256):
        chunk = clicks[i:i + 256]
        trainer.step(trainer.make_batch(chunk, catalog, history.before_each(chunk)))


@pytest.fixture
def train() -> Callable[[OnlineTrainer, ItemCatalog, list[Click], RecentHistory], None]:
    """Train ``trainer`` on ``clicks`` in batches of 256, each click with its user's history before it."""
    return _train


def _held_out_hit_rates(config, catalog, clicks, *, k: int, monkeypatch=None) -> tuple[float, float]:
    """HR@k of the trained towers and of most-popular on the last 20% of ``clicks``, after one
    pass over the first 80%. With ``monkeypatch``, both optimisers' steps are no-ops."""
    trainer = OnlineTrainer(config)
    if monkeypatch is not None:
        monkeypatch.setattr(SparseRowOptimizer, "step", lambda self, batch_size: None)
        if trainer._dense_opt is not None:  # the FM has no dense layers
            monkeypatch.setattr(type(trainer._dense_opt), "step", lambda self, closure=None: None)
    split = int(len(clicks) * 0.8)
    train, held_out = clicks[:split], clicks[split:]
    history = RecentHistory(config.history_len)
    for i in range(0, split, 256):
        chunk = train[i:i + 256]
        trainer.step(trainer.make_batch(chunk, catalog, history.before_each(chunk)))
    ids = list(catalog.keys())
    with torch.no_grad():
        items = trainer.model.item(trainer.featurizer.encode_items([catalog[i] for i in ids]))
        users = trainer.model.user(trainer.featurizer.users([c.user_id for c in held_out],
                                                            history.before_each(held_out)))
    top = torch.topk(users @ items.T, k, dim=1).indices.tolist()
    model_hr = sum(c.item_id in {ids[j] for j in row} for c, row in zip(held_out, top)) / len(held_out)
    popular = {i for i, _ in Counter(c.item_id for c in train).most_common(k)}
    return model_hr, sum(c.item_id in popular for c in held_out) / len(held_out)


@pytest.fixture
def held_out_hit_rates() -> Callable[..., tuple[float, float]]:
    """The learning bar's helper (trainer and FM tests): see :func:`_held_out_hit_rates`."""
    return _held_out_hit_rates
