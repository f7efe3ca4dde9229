"""Architectures that safetensors weights are loaded into, found by name.

safetensors holds tensors only — no code — which is why it is safe to load;
the code that gives the tensors meaning must come from somewhere trusted. It
comes from here: a built-in name, an entry point in the ``maas_gateway.archs``
group (``name = "package.module:Class"``) installed by a team's own package, or
a dotted ``package.module:Class`` written in the config (the config's author is
trusted to name code; the model file never is).

An architecture is an ``nn.Module`` class constructible without arguments. It
may declare ``input_shape`` (one sample, without the batch dimension),
``input_datatype`` and ``output_shape`` so the v2 metadata route and the
request checks know what it takes.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ENTRY_POINT_GROUP = "maas_gateway.archs"


class DigitsMLP(nn.Module):
    """The bundled digits classifier: 8x8 images (values 0..16, as scikit-learn ships them) -> 10 probabilities."""

    input_shape = (64,)
    input_datatype = "FP32"
    output_shape = (10,)
    hidden = 64

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, self.hidden)
        self.fc2 = nn.Linear(self.hidden, 10)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x / 16.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(x), dim=1)


class SeedMLP(nn.Module):
    """The reference "model as a service" MLP (784 -> 128 -> 10, log-softmax), as in the seed Flask app."""

    input_shape = (784,)
    input_datatype = "FP32"
    output_shape = (10,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


BUILTIN: dict[str, type[nn.Module]] = {"digits-mlp": DigitsMLP, "seed-mlp": SeedMLP}


class ArchError(Exception):
    """The architecture name cannot be resolved; ``str()`` is one line."""


def resolve(name: str) -> type[nn.Module]:
    """The ``nn.Module`` class for ``name``: built-in, entry point, or ``package.module:Class``."""
    if name in BUILTIN:
        return BUILTIN[name]
    target: str | None = None
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            target = ep.value
            break
    if target is None:
        if ":" not in name:
            known = ", ".join(sorted(BUILTIN))
            raise ArchError(f"unknown arch {name!r} (built in: {known}; or an entry point in {ENTRY_POINT_GROUP}, "
                            "or 'package.module:Class')")
        target = name
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchError(f"arch {name!r}: cannot import {module_name}: {exc}") from None
    cls: Any = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise ArchError(f"arch {name!r}: {module_name} has no {attr}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArchError(f"arch {name!r}: {target} is not an nn.Module class")
    return cls


def instantiate(name: str) -> nn.Module:
    cls = resolve(name)
    try:
        return cls()
    except TypeError as exc:
        raise ArchError(f"arch {name!r}: must be constructible without arguments ({exc})") from None
