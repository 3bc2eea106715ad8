"""Frozen config dataclasses, checked and (de)serialised by their type hints.

One small engine for :mod:`.config` and :class:`.plan.PlanConfig`: :func:`check_types` checks
every field against its annotation (``Literal``, ``int``, ``float``, ``bool``, ``str``, ``None``
unions, ``tuple[...]``, ``frozenset[...]``, nested dataclasses) and raises
:class:`~hf_dpdedup.errors.ConfigError` naming the field and what it takes; :func:`encode` /
:func:`decode` turn a config into JSON-ready dicts and back. A *choice* is a union of dataclasses
that each carry a ``kind`` class variable (``Public | SVT | NaiveLaplace``): it is encoded as
``{"kind": ..., **fields}`` and decoded by its kind.
"""

from __future__ import annotations

import dataclasses
import math
import types
from functools import cache
from typing import Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from ..errors import ConfigError


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every init field of dataclass ``cls``."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def literal_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The values a ``Literal`` field takes (``Literal[...] | None`` too, without the None)."""
    hint = field_types(cls)[name]
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    return tuple(v for option in options if get_origin(option) is Literal for v in get_args(option))


def choice_kinds(cls: type, name: str) -> dict[str, type]:
    """``{kind: class}`` of a choice field (a union of dataclasses with a ``kind``)."""
    return {c.kind: c for c in get_args(field_types(cls)[name]) if dataclasses.is_dataclass(c)}


def describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(v) for v in get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in get_args(hint))
    if hint is type(None):
        return "None"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has type ``hint`` (bools are not numbers; ints are floats; floats are finite)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin is frozenset:
        return isinstance(value, frozenset) and all(matches(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_types(obj: Any) -> None:
    """Raise :class:`ConfigError` for the first field of dataclass ``obj`` whose value is not of its type."""
    cls = type(obj)
    for name, hint in field_types(cls).items():
        value = getattr(obj, name)
        if not matches(value, hint):
            raise ConfigError(f"{cls.__name__}.{name} takes {describe(hint)}, got {value!r}"
                              f" ({type(value).__name__}).")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def encode(value: Any) -> Any:
    """A config value as JSON-ready data (choices tagged ``kind``, sets as sorted lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        body = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        kind = getattr(type(value), "kind", None)
        return {"kind": kind, **body} if kind is not None else body
    if isinstance(value, frozenset):
        return sorted(encode(v) for v in value)
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    return value


def decode(cls: type, data: Any, *, where: str | None = None) -> Any:
    """The dataclass ``cls`` from :func:`encode`'s output; unknown keys and kinds are errors."""
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of its fields, got {data!r}.")
    known = field_types(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where} has no field(s) {unknown}; its fields are {sorted(known)}.")
    kwargs = {name: _decode_value(value, known[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{where}: {exc}.") from None


def _decode_value(value: Any, hint: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        kinds = {a.kind: a for a in args if dataclasses.is_dataclass(a) and hasattr(a, "kind")}
        if kinds and isinstance(value, Mapping):
            kind = value.get("kind")
            if kind not in kinds:
                raise ConfigError(f"{where}: unknown kind {kind!r}; use one of {sorted(kinds)}.")
            return decode(kinds[kind], {k: v for k, v in value.items() if k != "kind"}, where=f"{where}[{kind}]")
        if value is None:
            return None
        others = [a for a in args if a is not type(None)]
        return _decode_value(value, others[0], where) if len(others) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return decode(hint, value, where=where)
    if origin is frozenset and isinstance(value, list):
        return frozenset(_decode_value(v, args[0], where) for v in value)
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode_value(v, args[0], where) for v in value)
        if len(args) == len(value):
            return tuple(_decode_value(v, a, where) for v, a in zip(value, args))
        return tuple(value)  # the type check names the length it takes
    return value
