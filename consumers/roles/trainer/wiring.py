"""The trainer process assembled in one place: its clients, side readers, sink and handler."""

from __future__ import annotations

import logging
from contextlib import ExitStack

from streamrecall.consumers.assembly import RoleAssembly, model_config
from streamrecall.consumers.roles.trainer.handler import CHECKPOINT_FILE, TrainerHandler
from streamrecall.consumers.roles.trainer.metrics import TrainerMetrics
from streamrecall.consumers.roles.trainer.options import ROLE, TrainerOptions
from streamrecall.consumers.roles.trainer.sink import KafkaUpdateSink
from streamrecall.consumers.start import StartPosition
from streamrecall.consumers.table import ItemTable, TopicReader
from streamrecall.consumers.update_chunks import MAX_RECORD_BYTES
from streamrecall.consumers.update_scan import last_published
from streamrecall.consumers.update_codec import update_max_bytes
from streamrecall.errors import ConfigError
from streamrecall.events import Click, Decoder, Item
from streamrecall.metrics import role_metrics
from streamrecall.model import OnlineTrainer
from streamrecall.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings, start: StartPosition) -> None:
    """Run the trainer until SIGTERM/SIGINT, then train the rest, publish and checkpoint."""
    options = TrainerOptions.from_settings(settings)
    trainer = OnlineTrainer(model_config(settings))
    topics = settings.topics
    with ExitStack() as stack:
        process = RoleAssembly(ROLE, settings, stack)
        # Chunks are at most 1 MiB records; a send waits at most 15 s for metadata or buffer space
        # (then the update counts as failed: the trainer backs off and keeps training).
        update_producer = process.producer(max_request_size=MAX_RECORD_BYTES, linger_ms=0, max_block_ms=15_000)

        table = ItemTable(options.catalog_items)
        items = TopicReader(process.consumer(), topics.items, "items", Decoder(Item, settings.max_value_bytes).decode,
                            table.apply, process.deadletters)
        clicks_partitions = sorted(items.consumer.partitions_for_topic(topics.clicks) or ())
        if not clicks_partitions:
            raise ConfigError(f"topic {topics.clicks} does not exist; run `streamrecall topics create`")

        # The fencing epoch: one past the highest on the topic (verified records only, with a key), so
        # replicas refuse a trainer this one replaces if it keeps publishing (docs/security.md).
        published = last_published(process.consumer(), topics.model_updates, settings.model_signing_key,
                                   update_max_bytes(settings, trainer.config))
        epoch = published.trainer_epoch + 1
        sink = KafkaUpdateSink(update_producer, topics.model_updates, epoch, settings.model_signing_key,
                               chunk_bytes=settings.model_update_chunk_bytes)
        handler = TrainerHandler(trainer, table.catalog, sink,
                                 settings.role_state_dir(ROLE) / CHECKPOINT_FILE, topics.clicks, clicks_partitions,
                                 options, role_metrics(TrainerMetrics), poll_items=items.poll, trainer_epoch=epoch)
        handler.restore()
        if published.version > trainer.version:
            log.info("model-updates already holds v%d; the next update goes past it", published.version)
        trainer.advance_version(published.version)
        log.info("trainer epoch %d (model updates %s)", epoch,
                 "signed" if settings.model_signing_key is not None else "unsigned: no model_signing_key")

        items.start()
        items.catch_up(options.startup_timeout_s)
        log.info("items table: %d items", len(table.catalog))
        if handler.restored:  # consumers may hold deltas past the checkpoint: reset them now
            handler.publish()
        try:
            # A failing flush (a publish not acknowledged) does not pause the clicks: training goes on
            # while the commit waits for the next acknowledged (full) update.
            process.run(start, handler, {topics.clicks: ("clicks", Decoder(Click, settings.max_value_bytes).decode)},
                        pause_on_flush_failure=False)
        finally:
            handler.shutdown()
