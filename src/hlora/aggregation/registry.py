"""Aggregation methods by name: `method = "..."` in the config picks one, `[method_options]` tunes it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

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
    """Every registered method, alphabetically (for messages that list the allowed names)."""
    return sorted(_METHODS)


def ordered() -> list[str]:
    """Every registered method in its `order`: the default of `hlora compare --methods`, the order of
    `hlora methods` and of the report's tables."""
    return sorted(_METHODS, key=lambda name: (_METHODS[name].order, name))


def reference() -> str:
    """The method the references train with (`Aggregator.reference`): the identity on one update."""
    found = [name for name, cls in _METHODS.items() if cls.reference]
    if len(found) != 1:
        raise RuntimeError(f"exactly one method must be the references' rule; registered: {found}")
    return found[0]


def get(name: str) -> type[Aggregator]:
    """The method class registered as `name`; ConfigError (listing the allowed names) if there is none."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown aggregation method {name!r}; allowed: {', '.join(names())}") from None


def validate_options(name: str, options: Mapping[str, Any] | None) -> BaseModel | None:
    """The method's `Options` built from a `[method_options]` table (None for a method without options).

    Raises ConfigError naming the offending `method_options.<key>` and the keys the method allows.
    """
    cls = get(name)
    options = dict(options or {})
    if cls.Options is None:
        if options:
            raise ConfigError(
                f"method_options.{next(iter(options))}: method {name!r} takes no options "
                f"(got {', '.join(sorted(options))})"
            )
        return None
    allowed = ", ".join(cls.Options.model_fields) or "none"
    try:
        return cls.Options.model_validate(options)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                f"method_options.{key}: not an option of method {name!r}; allowed: {allowed}"
            ) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"method_options.{key}: {msg} (got {err.get('input')!r}); {name!r} options: {allowed}"
        ) from None


def create(name: str, bank_rank: int, seed: int = 0, options: Mapping[str, Any] | None = None) -> Aggregator:
    """A fresh aggregator of method `name` at the server's `bank_rank`, with its options validated."""
    cls = get(name)
    return cls(bank_rank=bank_rank, seed=seed, options=validate_options(name, options))
