"""The three roles. Each module exposes ``run(settings, start) -> None``, a long-running process."""

from __future__ import annotations

import importlib

from streamrecall.consumers.clients import check_reachable
from streamrecall.consumers.start import StartPosition
from streamrecall.errors import StreamrecallError
from streamrecall.settings import ROLES, Settings


def available_roles() -> list[str]:
    """Roles that this installation implements."""
    return [r for r in ROLES if importlib.util.find_spec(f"streamrecall.consumers.roles.{r}") is not None]


def run_role(role: str, settings: Settings, start: StartPosition) -> None:
    if role not in available_roles():
        raise StreamrecallError(f"role {role!r} is not implemented in this version (available: {available_roles()})")
    import torch

    torch.set_num_threads(settings.torch_threads)
    module = importlib.import_module(f"streamrecall.consumers.roles.{role}")
    check_tables(settings)
    check_reachable(settings)  # before anything is logged: an unreachable broker is one clear line
    settings.log_effective(role)
    module.run(settings, start)


def check_tables(settings: Settings) -> None:
    """Refuse a bad ``[model]`` or role table before the settings are logged: every role reads the
    same file, and a value under a misspelt key must be refused, not printed."""
    from streamrecall.consumers.app import model_config
    from streamrecall.consumers.indexer_state import IndexerConfig
    from streamrecall.consumers.roles.publisher import PublisherOptions
    from streamrecall.consumers.roles.trainer import TrainerOptions

    model_config(settings)
    for options in (IndexerConfig, PublisherOptions, TrainerOptions):
        options.from_settings(settings)
