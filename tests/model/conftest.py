"""Small-model fixtures for the learning core (tables of thousands of rows, not millions)."""

from __future__ import annotations

from typing import Callable

import msgspec
import pytest
import torch

from streamrecall.events import Click, Item
from streamrecall.model import ItemCatalog, ModelConfig
from streamrecall.synthetic import SyntheticConfig, generate

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
