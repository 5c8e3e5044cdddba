"""The roles, each in its own folder: ``options`` (its settings table), ``handler`` (what it does
with each record, Kafka-free), its sinks and metrics, and ``wiring`` (the process assembled in one
place: ``run(settings, start) -> None``, a long-running process)."""

from __future__ import annotations

import importlib

from streamrecall.consumers.clients import check_reachable
from streamrecall.consumers.start import StartPosition
from streamrecall.gc_tuning import configure as configure_gc
from streamrecall.settings import Settings


def run_role(role: str, settings: Settings, start: StartPosition) -> None:
    import torch

    torch.set_num_threads(settings.torch_threads)
    configure_gc()
    wiring = importlib.import_module(f"streamrecall.consumers.roles.{role}.wiring")
    check_tables(settings)
    check_reachable(settings)  # before anything is logged: an unreachable broker is one clear line
    settings.log_effective(role)
    wiring.run(settings, start)


def check_tables(settings: Settings) -> None:
    """Refuse a bad ``[model]`` or role table before the settings are logged: every role reads the
    same file, and a value under a misspelt key must be refused, not printed."""
    from streamrecall.consumers.assembly import model_config
    from streamrecall.consumers.roles.indexer.options import IndexerOptions
    from streamrecall.consumers.roles.publisher.options import PublisherOptions
    from streamrecall.consumers.roles.router.options import RouterOptions
    from streamrecall.consumers.roles.trainer.options import TrainerOptions

    model_config(settings)
    for options in (IndexerOptions, PublisherOptions, RouterOptions, TrainerOptions):
        options.from_settings(settings)
