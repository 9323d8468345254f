"""Turn loose key/value input (CLI strings, UI values, JSON) into a worker's typed, frozen Params."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            if type(None) in get_args(tp):
                return None
        last: Exception | None = None
        for a in args:
            try:
                return _coerce(name, value, a)
            except ValueError as e:
                last = e
        raise last or ValueError(f"{name}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a whole number; got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError(f"{name} must be a whole number; got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number; got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def build(cls: type, values: dict[str, Any]) -> Any:
    """`cls(**values)` with each value coerced to its field's type; unknown keys and bad values raise ValueError."""
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def parse_cli(pairs: list[str]) -> dict[str, str]:
    """`["a=1", "b=x"]` -> `{"a": "1", "b": "x"}`."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--param takes key=value; got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out
