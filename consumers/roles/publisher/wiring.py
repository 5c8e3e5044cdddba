"""The publisher process assembled in one place: its clients, model-update feed, sink and handler."""

from __future__ import annotations

import logging
from contextlib import ExitStack

from streamrecall.consumers.assembly import RoleAssembly, model_config
from streamrecall.consumers.roles.publisher.handler import PublisherHandler
from streamrecall.consumers.roles.publisher.options import ROLE, PublisherOptions
from streamrecall.consumers.roles.publisher.sink import KafkaVectorSink
from streamrecall.consumers.roles.publisher.vector_table import VectorTable
from streamrecall.consumers.start import StartPosition
from streamrecall.consumers.updates import ModelUpdateFeed
from streamrecall.consumers.update_codec import update_max_bytes
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
        process = RoleAssembly(ROLE, settings, stack)
        vectors = VectorTable(process.consumer(), topics.user_vectors, process.deadletters,
                              settings.max_value_bytes, settings.max_event_ahead_ms, options.rebuild_timeout_s)
        n_clicks = len(vectors.consumer.partitions_for_topic(topics.clicks) or ())
        n_vectors = len(vectors.consumer.partitions_for_topic(topics.user_vectors) or ())
        if n_clicks == 0 or n_clicks != n_vectors:
            raise ConfigError(f"{topics.clicks} has {n_clicks} partitions and {topics.user_vectors} {n_vectors}: "
                              "they must exist and match (a clicks partition's state lives in the same-numbered "
                              "user-vectors partition)")

        feed = ModelUpdateFeed(process.consumer(), topics.model_updates, replica, process.deadletters,
                               max_bytes=update_max_bytes(settings, config), signing_key=settings.model_signing_key,
                               role=ROLE)
        stack.callback(feed.stream.close)  # its staging worker; the consumer closes with the process
        feed.start(options.startup_timeout_s)
        handler = PublisherHandler(replica, KafkaVectorSink(process.producer(), topics.user_vectors), vectors.load,
                                   topics.clicks, options, poll_updates=feed.poll)
        handler.version_metrics.version.labels(ROLE).set(replica.version)
        log.info("publisher at model v%d", replica.version)
        clicks = Decoder(Click, settings.max_value_bytes, settings.max_event_ahead_ms).decode
        process.run(start, handler, {topics.clicks: ("clicks", clicks)})
