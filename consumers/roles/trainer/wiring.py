"""The trainer process assembled in one place: its clients, side readers, sink and handler."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Callable

from streamrecall.consumers.assembly import RoleAssembly, model_config
from streamrecall.consumers.roles.trainer.handler import CHECKPOINT_FILE, TrainerHandler
from streamrecall.consumers.roles.trainer.metrics import TrainerMetrics
from streamrecall.consumers.roles.trainer.options import ROLE, TrainerOptions
from streamrecall.consumers.roles.trainer.ranks import NoUpdates, RankedTrainerHandler, rank_partitions
from streamrecall.consumers.roles.trainer.sink import KafkaUpdateSink
from streamrecall.consumers.start import StartPosition
from streamrecall.consumers.table import ItemTable, TopicReader
from streamrecall.consumers.update_chunks import MAX_RECORD_BYTES
from streamrecall.consumers.update_scan import last_published
from streamrecall.consumers.update_codec import update_max_bytes
from streamrecall.errors import ConfigError
from streamrecall.events import Click, Decoder, Item
from streamrecall.metrics import role_metrics
from streamrecall.model import ModelConfig, OnlineTrainer
from streamrecall.model.data_parallel import Collective, DataParallelTrainer
from streamrecall.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings, start: StartPosition) -> None:
    """Run the trainer until SIGTERM/SIGINT, then train the rest, publish and checkpoint.
    With ``world_size`` > 1, this process is one rank of a data-parallel job (:func:`run_rank`)."""
    if settings.world_size > 1:
        run_rank(settings, start)
        return
    options = TrainerOptions.from_settings(settings)
    trainer = OnlineTrainer(model_config(settings))
    topics = settings.topics
    with ExitStack() as stack:
        process = RoleAssembly(ROLE, settings, stack)
        table, items, clicks_partitions = _inputs(process, options)
        sink, epoch, published_version = _update_sink(process, trainer.config)
        handler = TrainerHandler(trainer, table.catalog, sink,
                                 settings.role_state_dir(ROLE) / CHECKPOINT_FILE, topics.clicks, clicks_partitions,
                                 options, role_metrics(TrainerMetrics), poll_items=items.poll, trainer_epoch=epoch)
        handler.restore()
        if published_version > trainer.version:
            log.info("model-updates already holds v%d; the next update goes past it", published_version)
        trainer.advance_version(published_version)
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
            process.run(start, handler, {topics.clicks: ("clicks", _clicks_decoder(settings))},
                        pause_on_flush_failure=False)
        finally:
            handler.shutdown()


def run_rank(settings: Settings, start: StartPosition) -> None:
    """Run rank ``settings.rank`` of a data-parallel trainer job (``consumers/roles/trainer/ranks.py``)
    until any rank stops (SIGTERM/SIGINT: the job leaves together) or a peer fails (exit 2)."""
    options = TrainerOptions.from_settings(settings)
    if options.replay_capacity:
        raise ConfigError("trainer.replay_capacity: replay is not supported with world_size > 1 (set it to 0)")
    rank, world = settings.rank, settings.world_size
    topics = settings.topics
    with ExitStack() as stack:
        process = RoleAssembly(ROLE, settings, stack)
        table, items, clicks_partitions = _inputs(process, options)
        own = rank_partitions(clicks_partitions, rank, world)
        if not own:
            log.warning("rank %d of %d: %s has %d partitions, none for this rank: it joins every step with an "
                        "empty share", rank, world, topics.clicks, len(clicks_partitions))
        model = model_config(settings)
        # Only rank 0 publishes, so only it takes a fencing epoch (docs/security.md).
        sink, epoch, published_version = _update_sink(process, model) if rank == 0 else (NoUpdates(), 0, 0)
        # The slow local work (the items table, rank 0's scan) is done before joining, so no rank
        # waits for another's start-up in a collective (bounded by collective_timeout_s).
        items.start()
        items.catch_up(options.startup_timeout_s)
        log.info("items table: %d items", len(table.catalog))
        log.info("rank %d of %d: joining the job at %s:%d", rank, world, settings.master_addr, settings.master_port)
        comm = Collective.join(rank=rank, world_size=world, master_addr=settings.master_addr,
                               master_port=settings.master_port, timeout_s=options.collective_timeout_s)
        stack.callback(comm.close)
        trainer = DataParallelTrainer(model, comm)
        handler = RankedTrainerHandler(trainer, table.catalog, sink,
                                       settings.role_state_dir(ROLE) / CHECKPOINT_FILE, topics.clicks,
                                       clicks_partitions, options, role_metrics(TrainerMetrics),
                                       poll_items=items.poll, trainer_epoch=epoch, own=own)
        handler.restore()
        trainer.advance_version(published_version)
        log.info("rank %d of %d: clicks partitions %s%s", rank, world, own,
                 f"; publishing as trainer epoch {epoch}" if rank == 0 else "")
        if rank == 0 and handler.restored:  # consumers may hold deltas past the checkpoint: reset them now
            handler.publish()
        try:
            process.run(start, handler, {topics.clicks: ("clicks", _clicks_decoder(settings))},
                        until=lambda: handler.finished, pause_on_flush_failure=False, assign_all=True,
                        partitions=lambda _topic, p: p in own, poll_timeout_ms=options.rank_poll_ms)
        finally:
            handler.shutdown()


def _clicks_decoder(settings: Settings) -> Callable[[bytes | None], Click]:
    return Decoder(Click, settings.max_value_bytes, settings.max_event_ahead_ms).decode


def _inputs(process: RoleAssembly, options: TrainerOptions) -> tuple[ItemTable, TopicReader, list[int]]:
    """The items table and its side reader (not started yet), and the clicks partitions."""
    settings, topics = process.settings, process.settings.topics
    table = ItemTable(options.catalog_items)
    decode = Decoder(Item, settings.max_value_bytes, settings.max_event_ahead_ms).decode
    items = TopicReader(process.consumer(), topics.items, "items", decode, table.apply, process.deadletters)
    clicks_partitions = sorted(items.consumer.partitions_for_topic(topics.clicks) or ())
    if not clicks_partitions:
        raise ConfigError(f"topic {topics.clicks} does not exist; run `streamrecall topics create`")
    return table, items, clicks_partitions


def _update_sink(process: RoleAssembly, model: ModelConfig) -> tuple[KafkaUpdateSink, int, int]:
    """The model-update sink, this process's fencing epoch and the newest version on the topic."""
    settings, topics = process.settings, process.settings.topics
    # Chunks are at most 1 MiB records; a send waits at most 15 s for metadata or buffer space
    # (then the update counts as failed: the trainer backs off and keeps training).
    update_producer = process.producer(max_request_size=MAX_RECORD_BYTES, linger_ms=0, max_block_ms=15_000)
    # The fencing epoch: one past the highest on the topic (verified records only, with a key), so
    # replicas refuse a trainer this one replaces if it keeps publishing (docs/security.md).
    published = last_published(process.consumer(), topics.model_updates, settings.model_signing_key,
                               update_max_bytes(settings, model))
    epoch = published.trainer_epoch + 1
    sink = KafkaUpdateSink(update_producer, topics.model_updates, epoch, settings.model_signing_key,
                           chunk_bytes=settings.model_update_chunk_bytes)
    return sink, epoch, published.version
