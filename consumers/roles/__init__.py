"""The three roles. Each module exposes ``run(settings, start) -> None``, a long-running process."""

from __future__ import annotations

import importlib

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
    settings.log_effective(role)
    module.run(settings, start)
