"""`streamrecall status`'s settled line, against a real HTTP server answering /healthz."""

from __future__ import annotations

from contextlib import ExitStack

from prometheus_client import CollectorRegistry

from streamrecall.devtools.broker import free_port
from streamrecall.consumers.roles.indexer.http_api import RecallService
from streamrecall.consumers.roles.indexer.http_server import RecallApi
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.roles.indexer.state import IndexerState
from streamrecall.index import QualityMonitor
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.model import ModelConfig
from streamrecall.settings import Settings
from streamrecall.ops.status import settled_line

MODEL = ModelConfig(dim=8, hidden=8, id_buckets=64, token_buckets=64, estimator_buckets=64)


def serving(health: dict) -> tuple[ExitStack, Settings]:
    state = IndexerState(IndexerOptions(), MODEL, IndexerMetrics(CollectorRegistry()))
    service = RecallService(state, state.config, QualityMonitor(state.index), lambda: (True, health))
    api = RecallApi(service, "127.0.0.1", 0)
    stack = ExitStack()
    api.start()
    stack.callback(api.stop)
    return stack, Settings(http_host="127.0.0.1", http_port=api.address[1])


def test_settled_needs_zero_lag_everywhere_and_the_indexer_settled():
    stack, settings = serving({"settled": True, "model_version": 7, "reencode_pending": 0})
    with stack:
        assert settled_line(settings, 0).startswith("settled: yes (model versions: trainer")
        assert settled_line(settings, 3).startswith("settled: no")
    stack, settings = serving({"settled": False, "model_version": 7, "reencode_pending": 2})
    with stack:
        assert settled_line(settings, 0).startswith("settled: no") and "pending 2" in settled_line(settings, 0)


def test_roles_at_different_versions_are_not_settled():
    from prometheus_client import start_http_server

    from streamrecall.metrics import ModelVersionMetrics

    stack, settings = serving({"settled": True, "model_version": 7, "reencode_pending": 0})
    with stack:
        registry = CollectorRegistry()
        ModelVersionMetrics(registry).version.labels("publisher").set(5)
        port = free_port()
        server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
        try:
            ports = {"indexer": settings.http_port, "trainer": free_port(), "publisher": port}
            line = settled_line(settings, 0, ports)
        finally:
            server.shutdown()
    assert line.startswith("settled: no") and "publisher v5" in line and "trainer ?" in line


def test_without_an_indexer_settled_is_unknown():
    line = settled_line(Settings(http_host="127.0.0.1", http_port=free_port()), 0)
    assert line.startswith("settled: unknown")
