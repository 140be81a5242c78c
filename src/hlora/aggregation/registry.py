"""Aggregation methods by name: `method = "..."` in the config picks one."""

from __future__ import annotations

from hlora.aggregation.base import Aggregator
from hlora.errors import ConfigError

_METHODS: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: make a method selectable by its `name`."""
    if cls.name in _METHODS:
        raise ValueError(f"aggregation method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_METHODS)


def create(name: str, bank_rank: int, seed: int = 0) -> Aggregator:
    try:
        cls = _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown aggregation method {name!r}; allowed: {', '.join(names())}") from None
    return cls(bank_rank=bank_rank, seed=seed)
