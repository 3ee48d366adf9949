"""Checks a JSON object against a frozen dataclass's fields before the dataclass is built from it (torch-free).

Plan files and GPU spec files are written by hand or by other versions, so `cls(**data)` must never be the
first thing that sees them: an unknown key would be a TypeError, `true` would pass as an int (bool is an int
subclass in Python), a string would reach arithmetic. `check_fields` refuses all of that with the offending
path named, and enforces the units carried by field names: `*_bytes` are non-negative ints or int maps,
`*_s` non-negative finite seconds.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60


def short(value) -> str:
    """A bounded repr for messages: deep or huge JSON values stay one short line."""
    return _REPR.repr(value)


def check_fields(where: str, data, cls: type, error: type[Exception], extra: dict[str, object] | None = None,
                 optional: bool = False, required: tuple[str, ...] = ()) -> None:
    """Raise `error` unless `data` is a dict with only `cls`'s fields (and `extra` keys), every field without a
    default (none when `optional`) and every `required` one present, and every value of its annotated type."""
    if not isinstance(data, dict):
        raise error(f"{where} must be a JSON object, got {type(data).__name__} {short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = {**{n: hints[n] for n in fields}, **(extra or {})}
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise error(f"{where} has unknown keys {short(unknown)}; known keys are {sorted(known)}")
    needed = set(required) | (set() if optional else {
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
    missing = sorted(needed - set(data))
    if missing:
        raise error(f"{where} is missing {missing}")
    for key, value in data.items():
        check_value(f"{where}.{key}", value, known[key], error)


def check_value(where: str, value, hint, error: type[Exception], unit: str | None = None) -> None:
    """Raise `error` unless `value` (from JSON) is of type `hint` and within the unit its name carries
    (`unit`: the field name, for the items of a map or list under it); a bad item is named by its path."""
    unit = unit or where.rsplit(".", 1)[-1]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict and isinstance(value, dict):
        for key, item in value.items():
            check_value(f"{where}.{key}", key, args[0], error, unit="")
            check_value(f"{where}.{key}", item, args[1], error, unit)
        return
    if origin in (tuple, list) and isinstance(value, list):
        for i, item in enumerate(value):
            check_value(f"{where}[{i}]", item, args[0], error, unit)
        return
    if not _matches(value, hint):
        raise error(f"{where} must be {_describe(hint)}, got {_json_type(value)} {short(value)}")
    if unit.endswith(("_bytes", "_s")) and isinstance(value, (int, float)) and value < 0:
        raise error(f"{where} must not be negative, got {short(value)}")


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 2.0 as 2.0 but a hand-written file may say 2
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is dict or hint is dict:
        key_t, value_t = args or (str, object)
        return isinstance(value, dict) and all(_matches(k, key_t) and _matches(v, value_t) for k, v in value.items())
    if origin in (tuple, list) or hint in (tuple, list):  # JSON has lists only
        item_t = args[0] if args else object
        return isinstance(value, list) and all(_matches(v, item_t) for v in value)
    if hint is object:
        return True
    return isinstance(value, dict)  # a nested dataclass: checked by its own check_fields


def _describe(hint, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if origin is dict:
        return ("JSON objects of " if plural else "a JSON object of ") + _describe(args[1], plural=True)
    if origin in (tuple, list):
        return ("lists of " if plural else "a list of ") + _describe(args[0], plural=True)
    one = {bool: "true or false", int: "an int", float: "a finite number", str: "a string", type(None): "null"}
    many = {bool: "booleans", int: "ints", float: "finite numbers", str: "strings", type(None): "nulls"}
    return (many if plural else one).get(hint, "JSON objects" if plural else "a JSON object")


def _json_type(value) -> str:
    names = {bool: "boolean", int: "int", float: "number", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
