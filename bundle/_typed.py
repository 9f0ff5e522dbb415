"""Frozen dataclasses <-> JSON, strictly: one declaration drives the parser, the writer and the JSON Schema.

A manifest class declares its fields with type hints (``str``, ``int``, ``float``, ``bool``, ``Literal[...]``,
``X | None``, ``tuple[X, ...]``, fixed ``tuple[X, Y]``, ``Mapping[str, X]``, another dataclass, or ``JsonObject``
for a report kept typed only at the top) and constraints in :func:`spec` (range, length, pattern, the JSON key).
:func:`parse` checks every value against them and raises :class:`~fundus_edge.errors.BundleError` naming the
field (``artifacts[1].path``); it never coerces ("224" is not 224, 224.0 is not an integer size, NaN is no
number). A class may add cross-field checks in a ``_check(self, where)`` method. :func:`dump` is the exact
inverse; :func:`json_schema` writes the same rules as JSON Schema (draft 2020-12).

Standard library only: the device reads bundles with the torch-free, numpy-free runtime install.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING
from typing import Any, Literal, Union

from ..errors import BundleError, BundleIntegrityError

JsonObject = Mapping[str, Any]  # a JSON object whose inside is not typed here (rich reports)
FIX = "rebuild the bundle with 'fundus-edge build' (a hand-edited or damaged manifest cannot be used)"


class Codec(typing.NamedTuple):
    """How a field whose class is not a manifest dataclass (PreprocessSpec, QualitySpec) goes to and from JSON."""

    parse: Callable[[Any, str], Any]
    dump: Callable[[Any], Any]
    schema: dict[str, Any]


class JsonRecord:
    """``from_dict`` / ``to_dict`` for a manifest dataclass (strict parse, exact inverse)."""

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Any:
        return parse(cls, data, where or cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        return dump(self)


def fail(where: str, problem: str, integrity: bool = False) -> typing.NoReturn:
    """Raise :class:`BundleError` (``integrity``: :class:`BundleIntegrityError`, a checksum is not covered or
    does not agree) naming the field."""
    if integrity:
        raise BundleIntegrityError(f"manifest field '{where}': {problem}; do not use this bundle")
    raise BundleError(f"manifest field '{where}': {problem}; {FIX}")


def spec(*, default: Any = MISSING, key: str | None = None, omit_none: bool = False, codec: Codec | None = None,
         ge: float | None = None, gt: float | None = None, le: float | None = None, min_len: int | None = None,
         pattern: str | None = None, doc: str = "") -> Any:
    """A dataclass field with JSON rules. A field with a default has the default None: the key is optional, and
    left out (never written as null) when None; ``omit_none`` says the same of a field without a default."""
    if default is not MISSING:
        if default is not None:
            raise TypeError("a manifest field's default is None (absent), so that a manifest round-trips exactly")
        omit_none = True
    meta = {k: v for k, v in dict(key=key, omit_none=omit_none, codec=codec, ge=ge, gt=gt, le=le, min_len=min_len,
                                  pattern=pattern, doc=doc).items() if not (v is None or v is False or v == "")}
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _json_key(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("key", f.name))


def _is_optional(tp: Any) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, (rest[0] if len(rest) == 1 else Union[tuple(rest)])  # noqa: UP007
    return False, tp


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _check_number(v: Any, meta: Mapping[str, Any], where: str) -> None:
    if not math.isfinite(v):
        fail(where, f"must be a finite number, got {v}")
    if "ge" in meta and v < meta["ge"]:
        fail(where, f"must be >= {meta['ge']}, got {v}")
    if "gt" in meta and v <= meta["gt"]:
        fail(where, f"must be > {meta['gt']}, got {v}")
    if "le" in meta and v > meta["le"]:
        fail(where, f"must be <= {meta['le']}, got {v}")


def _parse_scalar(tp: Any, v: Any, meta: Mapping[str, Any], where: str) -> Any:
    if tp is bool:
        if not isinstance(v, bool):
            fail(where, f"must be true or false, got {_type_name(v)} {v!r}")
        return v
    if tp is int:
        if not isinstance(v, int) or isinstance(v, bool):
            fail(where, f"must be an integer, got {_type_name(v)} {v!r}")
        _check_number(v, meta, where)
        return v
    if tp is float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            fail(where, f"must be a number, got {_type_name(v)} {v!r}")
        _check_number(float(v), meta, where)
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            fail(where, f"must be a string, got {_type_name(v)} {v!r}")
        if "min_len" in meta and len(v) < meta["min_len"]:
            fail(where, "must not be empty")
        if "pattern" in meta and not re.fullmatch(meta["pattern"], v):
            fail(where, f"{v!r} does not have the expected form ({meta['pattern']})")
        return v
    if tp is Any:
        return copy.deepcopy(v)
    raise TypeError(f"unsupported manifest field type {tp!r} at {where}")


def _parse_tuple(args: tuple[Any, ...], v: Any, meta: Mapping[str, Any], where: str) -> tuple[Any, ...]:
    if not isinstance(v, list):
        fail(where, f"must be an array, got {_type_name(v)} {v!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        if "min_len" in meta and len(v) < meta["min_len"]:
            fail(where, f"needs at least {meta['min_len']} entr{'y' if meta['min_len'] == 1 else 'ies'}, got {v!r}")
        item_meta = {k: x for k, x in meta.items() if k != "min_len"}
        return tuple(parse_value(args[0], x, item_meta, f"{where}[{i}]") for i, x in enumerate(v))
    if len(v) != len(args):
        fail(where, f"must have exactly {len(args)} entries, got {len(v)}")
    return tuple(parse_value(t, x, meta, f"{where}[{i}]") for i, (t, x) in enumerate(zip(args, v, strict=True)))


def parse_value(tp: Any, v: Any, meta: Mapping[str, Any], where: str) -> Any:
    """``v`` (decoded JSON) checked against the type ``tp`` and the rules ``meta``; raises naming ``where``."""
    if "codec" in meta:
        return meta["codec"].parse(v, where)
    optional, inner = _is_optional(tp)
    if optional:
        return None if v is None else parse_value(inner, v, meta, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return parse(typing.cast(type, tp), v, where)
    if origin is Literal:
        if isinstance(v, bool) or not isinstance(v, (str, int)) or v not in args:
            fail(where, f"must be one of {list(args)}, got {v!r}")
        return v
    if origin in (Union, types.UnionType):
        for alt in args:  # int | str: the first alternative whose JSON type matches
            if (alt is str and isinstance(v, str)) or (alt is int and isinstance(v, int) and not isinstance(v, bool)):
                return parse_value(alt, v, meta, where)
        fail(where, f"must be one of {[a.__name__ for a in args]}, got {_type_name(v)} {v!r}")
    if origin is tuple:
        return _parse_tuple(args, v, meta, where)
    if origin in (Mapping, dict, typing.Mapping):
        if not isinstance(v, dict):
            fail(where, f"must be an object, got {_type_name(v)}")
        if "min_len" in meta and len(v) < meta["min_len"]:
            fail(where, "must not be empty")
        item_meta = {k: x for k, x in meta.items() if k != "min_len"}
        return {k: parse_value(args[1], x, item_meta, f"{where}.{k}") for k, x in v.items()}
    return _parse_scalar(tp, v, meta, where)


def parse(cls: type[Any], data: Any, where: str) -> Any:
    """An instance of the manifest dataclass ``cls`` from the JSON object ``data`` (strict; see the module doc)."""
    if not isinstance(data, dict):
        fail(where, f"must be an object, got {_type_name(data)}")
    hints, fields = _hints(cls), dataclasses.fields(cls)
    known = {_json_key(f) for f in fields}
    unknown = sorted(set(data) - known)
    if unknown:
        fail(f"{where}.{unknown[0]}" if where else unknown[0],
             f"is not a field this runtime knows (it knows {sorted(known)}): a newer schema needs a newer "
             "fundus-edge, a typo needs a rebuild")
    kw: dict[str, Any] = {}
    for f in fields:
        key = _json_key(f)
        sub = f"{where}.{key}" if where else key
        if key not in data:
            if f.default is MISSING:
                fail(sub, "is missing")
            continue
        kw[f.name] = parse_value(hints[f.name], data[key], f.metadata, sub)
    obj = cls(**kw)
    check = getattr(obj, "_check", None)
    if check is not None:
        check(where)
    return obj


def dump_value(v: Any, meta: Mapping[str, Any] | None = None) -> Any:
    if meta and "codec" in meta and v is not None:
        return meta["codec"].dump(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dump(v)
    if isinstance(v, tuple):
        return [dump_value(x) for x in v]
    if isinstance(v, Mapping):
        return {k: dump_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [dump_value(x) for x in v]
    return v


def dump(obj: Any) -> dict[str, Any]:
    """The JSON object of a manifest dataclass: the exact inverse of :func:`parse`."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None and f.metadata.get("omit_none"):
            continue
        out[_json_key(f)] = dump_value(v, f.metadata)
    return out


def _number_schema(meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "ge" in meta:
        out["minimum"] = meta["ge"]
    if "gt" in meta:
        out["exclusiveMinimum"] = meta["gt"]
    if "le" in meta:
        out["maximum"] = meta["le"]
    return out


def _scalar_schema(tp: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer", **_number_schema(meta)}
    if tp is float:
        return {"type": "number", **_number_schema(meta)}
    if tp is str:
        out: dict[str, Any] = {"type": "string"}
        if "min_len" in meta:
            out["minLength"] = meta["min_len"]
        if "pattern" in meta:
            out["pattern"] = f"^(?:{meta['pattern']})$"
        return out
    if tp is Any:
        return {}
    raise TypeError(f"unsupported manifest field type {tp!r}")


def schema_value(tp: Any, meta: Mapping[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one value of type ``tp`` under the rules ``meta`` (dataclasses go into ``defs``)."""
    if "codec" in meta:
        return dict(meta["codec"].schema)
    optional, inner = _is_optional(tp)
    if optional:
        return {"anyOf": [schema_value(inner, meta, defs), {"type": "null"}]}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        name = typing.cast(type, tp).__name__
        if name not in defs:
            defs[name] = {}  # placeholder against recursion
            defs[name] = schema_of(typing.cast(type, tp), defs)
        return {"$ref": f"#/$defs/{name}"}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        return {"anyOf": [schema_value(a, meta, defs) for a in args]}
    item_meta = {k: x for k, x in meta.items() if k != "min_len"}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": schema_value(args[0], item_meta, defs),
                **({"minItems": meta["min_len"]} if "min_len" in meta else {})}
    if origin is tuple:
        return {"type": "array", "prefixItems": [schema_value(a, meta, defs) for a in args],
                "items": False, "minItems": len(args)}
    if origin in (Mapping, dict, typing.Mapping):
        return {"type": "object", "additionalProperties": schema_value(args[1], item_meta, defs),
                **({"minProperties": meta["min_len"]} if "min_len" in meta else {})}
    return _scalar_schema(tp, meta)


def schema_of(cls: type[Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of the manifest dataclass ``cls`` (cross-field ``_check`` rules are not expressible)."""
    hints = _hints(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        key = _json_key(f)
        s = schema_value(hints[f.name], f.metadata, defs)
        if f.metadata.get("doc"):
            s = {"description": f.metadata["doc"], **s}
        props[key] = s
        if f.default is MISSING:
            required.append(key)
    out: dict[str, Any] = {"type": "object", "properties": props, "required": required,
                           "additionalProperties": False}
    if cls.__doc__:
        out = {"description": " ".join(cls.__doc__.split()), **out}
    return out
