"""The networks this project can build, by name: one entry each (timm's pattern).

A network is one file that decorates its builder with ``@register_model``; the command-line
``--model`` choices, the names in result tables, the default checkpoint folder and the
default ``ModelConfig`` fields of each network are all read from here.

    @register_model("mynet", display="MyNet", defaults={"widths": (16, 32, 32, 32, 32)})
    def build_mynet(config: ModelConfig) -> nn.Module:
        return MyNet(config)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from utils.config import ModelConfig

DEFAULT_MODEL = "plcreg"


@dataclass(frozen=True)
class ModelEntry:
    """name: ``ModelConfig.arch``; display: the name in tables; builder: config -> module;
    defaults: ModelConfig fields that differ from PLCReg's for this network; requires: the
    optional package it needs (said in help texts), or ''."""
    name: str
    display: str
    builder: Callable[[ModelConfig], nn.Module]
    defaults: dict = field(default_factory=dict)
    requires: str = ""


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, display: str, defaults: dict | None = None, requires: str = ""):
    """Decorator: register ``builder(config) -> nn.Module`` under ``name``."""
    def add(builder):
        if name in MODELS:
            raise ValueError(f"register_model: {name!r} is registered twice")
        MODELS[name] = ModelEntry(name, display, builder, dict(defaults or {}), requires)
        return builder
    return add


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def default_config(name: str) -> ModelConfig:
    """The ModelConfig a network starts from (its entry's defaults over PLCReg's)."""
    return ModelConfig(arch=name, **model_entry(name).defaults)


def display_name(arch: str) -> str:
    return MODELS[arch].display if arch in MODELS else arch


def checkpoint_folder(dataset: str, name: str = DEFAULT_MODEL) -> str:
    """Default checkpoint folder: Checkpoint/<Set> for PLCReg, Checkpoint/<Set>_<name> otherwise."""
    return f"Checkpoint/{dataset}" if name == DEFAULT_MODEL else f"Checkpoint/{dataset}_{name}"
