"""Aggregators by name: the built-in algorithms and custom classes by dotted path.

``make_aggregator`` builds one and checks its arguments at once, so a DAG with a typo in
an aggregator name or parameter fails before any site is contacted.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from .base import Aggregator
from .names import BUILTIN_AGGREGATORS


class AggregatorConfigError(ValueError):
    """An unknown aggregator, or arguments it does not take."""


def _load_class(path: str) -> type:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, type[Aggregator]] = {name: _load_class(path) for name, path in BUILTIN_AGGREGATORS.items()}


def register_aggregator(cls: type[Aggregator], name: str | None = None) -> type[Aggregator]:
    """Make ``cls`` available under ``name`` (default: ``cls.name``); usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise AggregatorConfigError(f"{cls!r} is not a subclass of flare_provider.aggregation.Aggregator")
    key = name or cls.name
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise AggregatorConfigError(
            f"an aggregator named {key!r} is registered already ({_REGISTRY[key].__qualname__})"
        )
    _REGISTRY[key] = cls
    return cls


def available_aggregators() -> list[str]:
    """The registered names."""
    return sorted(_REGISTRY)


def make_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """A new aggregator: a registered name, or a class by dotted path (``pkg.module.Class``
    or ``pkg.module:Class``), with its keyword arguments."""
    cls = _resolve(name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        accepted = ", ".join(parameter_names(cls)) or "no arguments"
        raise AggregatorConfigError(f"aggregator {name!r}: {_reason(exc)}; it takes: {accepted}") from None
    except ValueError as exc:
        raise AggregatorConfigError(f"aggregator {name!r}: {exc}") from None


def parameter_names(cls: type[Aggregator]) -> list[str]:
    """Keyword arguments ``cls`` accepts, gathered along its base classes."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD) and param.name != "self":
                if param.name not in names:
                    names.append(param.name)
    return names


def _resolve(name: str) -> type[Aggregator]:
    if not isinstance(name, str) or not name:
        raise AggregatorConfigError(f"an aggregator name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "." not in name and ":" not in name:
        raise AggregatorConfigError(
            f"unknown aggregator {name!r}; choose one of {', '.join(available_aggregators())}"
            " or give a class as 'package.module.Class'"
        )
    module_name, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AggregatorConfigError(f"aggregator {name!r}: cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise AggregatorConfigError(f"aggregator {name!r}: module {module_name!r} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)) or inspect.isabstract(cls):
        raise AggregatorConfigError(
            f"aggregator {name!r} is not a concrete subclass of flare_provider.aggregation.Aggregator"
        )
    return cls


def _reason(exc: TypeError) -> str:
    # "FedAdam.__init__() got an unexpected keyword argument 'lr'" -> the part after the call
    text = str(exc)
    return text.split(") ", 1)[1] if ") " in text else text
