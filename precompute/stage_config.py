"""Stage settings: small frozen dataclasses built from the run's ``analysis`` dict, type-checked.

A run records every stage's settings (``analysis[stage]``); `stage_config` turns that dict into the stage's frozen
config, refusing unknown keys (listing the valid ones) and values of the wrong type, as nanoGPT's configurator
does without its ``exec``.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal, TypeVar

ConfigT = TypeVar("ConfigT")


class ConfigError(ValueError):
    """A precompute configuration that is refused before any work (unknown stage or setting, bad value)."""


def stage_config(cls: type[ConfigT], values: Mapping[str, Any] | None, stage: str) -> ConfigT:
    """Build a stage's frozen config from its ``analysis`` dict, refusing unknown keys and mistyped values.

    >>> from precompute.stages.stats import StatsConfig
    >>> stage_config(StatsConfig, {"bins": 10}, "stats").bins
    10
    >>> stage_config(StatsConfig, {"bin": 10}, "stats")
    Traceback (most recent call last):
    ...
    precompute.stage_config.ConfigError: unknown stats setting 'bin'; settings are bins, pre_range, post_range, \
token_top_k, token_min_count, max_vocab, vocab_top_k, tokens, max_tokens
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {stage} setting {unknown[0]!r}; settings are {', '.join(names)}")
    return cls(**{key: _coerce(f"{stage}.{key}", hints[key], value) for key, value in values.items()})


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check one config value against its annotation; JSON lists become tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        inner = args[0]
        return tuple(_coerce(name, inner, v) for v in value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ConfigError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}")
