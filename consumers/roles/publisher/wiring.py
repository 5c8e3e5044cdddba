"""The publisher process assembled in one place: its clients, model-update feed, sink and handler."""

from __future__ import annotations

import logging
from contextlib import ExitStack

from streamrecall.consumers.app import deadletter_sink, model_config, run_handler
from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.roles.publisher.handler import PublisherHandler
from streamrecall.consumers.roles.publisher.options import ROLE, PublisherOptions
from streamrecall.consumers.roles.publisher.sink import KafkaVectorSink
from streamrecall.consumers.roles.publisher.vector_table import VectorTable
from streamrecall.consumers.start import StartPosition
from streamrecall.consumers.updates import ModelUpdateFeed, update_max_bytes
from streamrecall.errors import ConfigError
from streamrecall.events import Click, Decoder
from streamrecall.model import TowerReplica
from streamrecall.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings, start: StartPosition) -> None:
    """Run the publisher until SIGTERM/SIGINT."""
    options = PublisherOptions.from_settings(settings)
    topics = settings.topics
    config = model_config(settings)
    replica = TowerReplica(config, settings.model_max_version_jump)
    with ExitStack() as stack:
        side_producer = make_producer(settings)
        stack.callback(side_producer.close, 10)
        side_deadletters = deadletter_sink(settings, ROLE, side_producer)
        vector_producer = make_producer(settings)
        stack.callback(vector_producer.close, 30)

        vectors = VectorTable(make_consumer(settings, None), topics.user_vectors, side_deadletters,
                              settings.max_value_bytes, options.rebuild_timeout_s)
        stack.callback(vectors.close)
        n_clicks = len(vectors.consumer.partitions_for_topic(topics.clicks) or ())
        n_vectors = len(vectors.consumer.partitions_for_topic(topics.user_vectors) or ())
        if n_clicks == 0 or n_clicks != n_vectors:
            raise ConfigError(f"{topics.clicks} has {n_clicks} partitions and {topics.user_vectors} {n_vectors}: "
                              "they must exist and match (a clicks partition's state lives in the same-numbered "
                              "user-vectors partition)")

        handler = PublisherHandler(replica, KafkaVectorSink(vector_producer, topics.user_vectors), vectors.load,
                                   topics.clicks, options, side_flush=lambda: side_deadletters.flush(30))
        feed = ModelUpdateFeed(make_consumer(settings, None), topics.model_updates, replica, side_deadletters,
                               on_applied=handler.on_model_update, max_bytes=update_max_bytes(settings, config),
                               signing_key=settings.model_signing_key)
        stack.callback(feed.close)
        handler.poll_updates = feed.poll
        feed.start(options.startup_timeout_s)
        handler.version_metrics.version.labels(ROLE).set(replica.version)
        log.info("publisher at model v%d", replica.version)
        run_handler(ROLE, settings, start, handler,
                    {topics.clicks: ("clicks", Decoder(Click, settings.max_value_bytes).decode)}, stack=stack)
