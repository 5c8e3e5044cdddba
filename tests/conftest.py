"""Shared fixtures: one real broker per test session, isolated topics per test."""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path
from typing import Callable

import pytest
import torch

from streamrecall.devtools.broker import EmbeddedBroker
from streamrecall.settings import Settings
from streamrecall.consumers.topics import create_topics

# Two cores: keep torch from oversubscribing them when tests run beside a broker.
torch.set_num_threads(1)

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedBroker:
    """A real Kafka-compatible broker (Tansu) over a socket on loopback, for the whole session."""
    external = os.environ.get("STREAMRECALL_TEST_BOOTSTRAP_SERVERS")
    if external:  # run the suite against an existing Kafka instead
        b = EmbeddedBroker()
        host, _, port = external.rpartition(":")
        b.host, b.port = host, int(port)
        yield b
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture
def settings_factory(broker: EmbeddedBroker, tmp_path: Path) -> Callable[..., Settings]:
    """Settings on the session broker with a unique topic prefix and group prefix per call."""

    def make(create: bool = True, **changes) -> Settings:
        tag = f"t{next(_counter)}-{uuid.uuid4().hex[:6]}"
        s = Settings(bootstrap_servers=broker.bootstrap_servers, topic_prefix=f"{tag}.",
                     group_prefix=f"g-{tag}", state_dir=tmp_path / "state", partitions=2, **changes)
        if create:
            create_topics(s)
        return s

    return make
