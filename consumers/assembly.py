"""One role process, assembled: what it opens, its one dead-letter sink, its poll loop.

A role's ``wiring.run`` builds a :class:`RoleAssembly` on its ExitStack, takes its clients from
it (each closed by the stack, in reverse order, however the loop ends), builds its handler and
side readers, and calls :meth:`RoleAssembly.run`. The process has **one** dead-letter sink: the
poll loop and every side reader send to it, and the runtime flushes it after the handler and
before each commit (as a checkpoint flushes its sinks before committing), so a record whose
offset is committed has its dead letter durable, wherever it was found. The sink skips records
this role dead-lettered in an earlier run (read back from the dead-letter topic once, when the
sink is first needed): no process-wide cache.
"""

from __future__ import annotations

import functools
import logging
from contextlib import ExitStack
from typing import Any, Callable, Mapping

from kafka import KafkaConsumer, KafkaProducer

from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import DeadLetterSink, sent_by_role
from streamrecall.consumers.liveness import Heartbeat
from streamrecall.consumers.handler import Decode, Handler
from streamrecall.consumers.runtime import Runtime
from streamrecall.consumers.start import StartPosition
from streamrecall.errors import ConfigError
from streamrecall.metrics import RUNTIME, serve_metrics
from streamrecall.model.config import ModelConfig
from streamrecall.model.errors import ModelConfigError
from streamrecall.settings import Settings

log = logging.getLogger(__name__)

#: A role's HTTP server: started on the stack, answering /livez from the loop's heartbeat.
ServeHttp = Callable[[ExitStack, Heartbeat], Any]


def model_config(settings: Settings) -> ModelConfig:
    """The model's settings: the ``[model]`` table of the TOML settings file over the defaults.
    Every role must use the same structural fields (updates carry them and are refused otherwise)."""
    if "signing_key" in settings.extra.get("model", {}):  # refused by name, value never echoed
        raise ConfigError("model.signing_key: the model-update signing key is the top-level setting "
                          "model_signing_key (STREAMRECALL_MODEL_SIGNING_KEY), a secret; move it out of [model]")
    try:
        return ModelConfig.from_dict(dict(settings.extra.get("model", {})))
    except ModelConfigError as exc:  # name it as the file does: model.dim
        raise ConfigError(f"model.{exc} (the [model] table of the settings file; its settings are in docs/model.md)") from None


class RoleAssembly:
    """What one role process opens, in one place, all closed by ``stack``."""

    def __init__(self, role: str, settings: Settings, stack: ExitStack) -> None:
        self.role = role
        self.settings = settings
        self.stack = stack

    def producer(self, close_timeout_s: float = 30.0, **config: Any) -> KafkaProducer:
        """A producer closed with the process (after waiting ``close_timeout_s`` for its sends)."""
        producer = make_producer(self.settings, **config)
        self.stack.callback(producer.close, close_timeout_s)
        return producer

    def consumer(self, **config: Any) -> KafkaConsumer:
        """A consumer of no group (side readers and scans assign their partitions), closed with the process."""
        consumer = make_consumer(self.settings, None, **config)
        self.stack.callback(consumer.close, autocommit=False)
        return consumer

    @functools.cached_property
    def deadletters(self) -> DeadLetterSink:
        """The process's one dead-letter sink, knowing what this role dead-lettered before."""
        settings = self.settings
        reader = make_consumer(settings, None, max_partition_fetch_bytes=1 << 20)
        try:
            sent = sent_by_role(reader, settings.topics.deadletter, self.role, capacity=settings.deadletter_dedup_max)
        finally:
            reader.close(autocommit=False)
        log.info("%s: %d records were dead-lettered by this role before; they are not sent again", self.role, len(sent))
        return DeadLetterSink(self.producer(10.0), settings.topics.deadletter, self.role, RUNTIME, already_sent=sent)

    def runtime(self, start: StartPosition, handler: Handler, topics: Mapping[str, tuple[str, Decode]], *,
                serve_http: ServeHttp | None = None, **runtime_options: Any) -> Runtime:
        """The role's poll loop over ``topics`` (physical name → (logical name, decode)), its group
        consumer, and its HTTP server: ``serve_http`` (the indexer's API, /metrics on its admin
        port) or /metrics on the role's port; either answers ``/livez`` from the loop's heartbeat."""
        settings = self.settings
        consumer = make_consumer(settings, settings.group_id(self.role))  # the runtime closes it
        heartbeat = Heartbeat()
        if serve_http is not None:
            serve_http(self.stack, heartbeat)
        else:
            server = serve_metrics(settings.http_host, settings.port_for(self.role), livez=heartbeat.answer)
            self.stack.callback(server.shutdown)
        return Runtime(role=self.role, consumer=consumer, deadletters=self.deadletters, handler=handler,
                       topics=topics, start=start, flush_interval_ms=settings.flush_interval_ms,
                       max_poll_records=settings.max_poll_records, heartbeat=heartbeat, **runtime_options)

    def run(self, start: StartPosition, handler: Handler, topics: Mapping[str, tuple[str, Decode]], *,
            serve_http: ServeHttp | None = None, **runtime_options: Any) -> Runtime:
        """Run the role's poll loop until SIGTERM/SIGINT (then it flushes and commits once more)."""
        runtime = self.runtime(start, handler, topics, serve_http=serve_http, **runtime_options)
        runtime.install_signal_handlers()
        log.info("%s running (start: %s)", self.role, start)
        runtime.run()
        log.info("%s stopped", self.role)
        return runtime
