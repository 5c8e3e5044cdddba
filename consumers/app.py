"""Wiring shared by every role: clients, dead letters, the runtime, metrics over HTTP, signals.

A role module builds its handler and calls :func:`run_handler`; everything a role opens
enters one ExitStack, so it is closed in reverse order however the loop ends.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any, Callable, Mapping

from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import DeadLetterSink, SentSet, sent_by_role
from streamrecall.consumers.liveness import Heartbeat
from streamrecall.consumers.runtime import Decode, Handler, Runtime
from streamrecall.consumers.start import StartPosition
from streamrecall.metrics import RUNTIME, serve_metrics
from streamrecall.errors import ConfigError
from streamrecall.model.config import ModelConfig
from streamrecall.model.errors import ModelConfigError
from streamrecall.settings import Settings

log = logging.getLogger(__name__)


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


_SENT: dict[tuple[str, str], SentSet] = {}


def deadletter_sink(settings: Settings, role: str, producer: Any) -> DeadLetterSink:
    """A dead-letter sink for ``role`` that skips records the role dead-lettered before (in an
    earlier run, before a crash): every sink of the process shares one set of source coordinates,
    read back from the dead-letter topic once per process."""
    key = (settings.topics.deadletter, role)
    if key not in _SENT:
        consumer = make_consumer(settings, None, max_partition_fetch_bytes=1 << 20)
        try:
            _SENT[key] = sent_by_role(consumer, settings.topics.deadletter, role,
                                      capacity=settings.deadletter_dedup_max)
        finally:
            consumer.close(autocommit=False)
        log.info("%s: %d records were dead-lettered by this role before; they are not sent again",
                 role, len(_SENT[key]))
    return DeadLetterSink(producer, settings.topics.deadletter, role, RUNTIME, already_sent=_SENT[key])


def run_handler(role: str, settings: Settings, start: StartPosition, handler: Handler,
                topics: Mapping[str, tuple[str, Decode]], *, assign_all: bool = False,
                serve_http: Callable[[ExitStack, Heartbeat], Any] | None = None,
                stack: ExitStack | None = None, until: Callable[[], bool] | None = None,
                **runtime_options: Any) -> Runtime:
    """Run ``handler`` over ``topics`` (physical name → (logical name, decode)) until SIGTERM/SIGINT.

    ``serve_http`` starts the role's own HTTP server (the indexer's API, with /metrics on its admin port);
    by default /metrics is served on the role's port. Either answers ``/livez`` from the poll
    loop's heartbeat (``consumers/liveness.py``). Pass ``stack`` to tie the role's own
    resources (producers, threads) to the same shutdown.
    """
    with ExitStack() as own:
        stack = stack if stack is not None else own
        consumer = make_consumer(settings, settings.group_id(role))
        dl_producer = make_producer(settings)
        stack.callback(dl_producer.close, 10)
        deadletters = deadletter_sink(settings, role, dl_producer)
        heartbeat = Heartbeat()
        if serve_http is not None:
            serve_http(stack, heartbeat)
        else:
            server = serve_metrics(settings.http_host, settings.port_for(role), livez=heartbeat.answer)
            stack.callback(server.shutdown)
        runtime = Runtime(role=role, consumer=consumer, deadletters=deadletters, handler=handler, topics=topics,
                          start=start, assign_all=assign_all, flush_interval_ms=settings.flush_interval_ms,
                          max_poll_records=settings.max_poll_records, heartbeat=heartbeat, **runtime_options)
        runtime.install_signal_handlers()
        log.info("%s running (start: %s)", role, start)
        runtime.run(until=until)
        log.info("%s stopped", role)
        return runtime
