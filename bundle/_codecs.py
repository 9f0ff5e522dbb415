"""JSON codecs for the manifest parts whose classes live elsewhere (PreprocessSpec, QualitySpec) or whose JSON is
flat (Producer). Each checks types strictly before the class sees the values (its own checks then apply)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..runtime.preprocess import PreprocessSpec
from ..runtime.quality import MEASURES, QualitySpec
from ._typed import Codec, fail, parse_value, schema_value


def _parse_preprocessing(v: Any, where: str) -> PreprocessSpec:
    if not isinstance(v, dict):
        fail(where, "must be an object")
    fields = [f.name for f in dataclasses.fields(PreprocessSpec)]
    for key in v:
        if key not in fields:
            fail(f"{where}.{key}", f"is not a preprocessing field this runtime knows ({fields}); upgrade fundus-edge")
    missing = [k for k in fields if k not in v]
    if missing:
        fail(f"{where}.{missing[0]}", "is missing (every preprocessing parameter is recorded, so the device "
             "reproduces what was measured)")
    types_ = typing.get_type_hints(PreprocessSpec)
    kw = {k: parse_value(types_[k], v[k], {}, f"{where}.{k}") for k in fields}
    try:
        return PreprocessSpec(**kw)
    except UsageError as exc:
        fail(where, str(exc))


def _preprocessing_schema() -> dict[str, Any]:
    types_ = typing.get_type_hints(PreprocessSpec)
    props = {f.name: schema_value(types_[f.name], {}, {}) for f in dataclasses.fields(PreprocessSpec)}
    props["size"].update(minimum=16, maximum=4096)
    props["std"]["prefixItems"] = [{"type": "number", "exclusiveMinimum": 0}] * 3
    props["layout"] = {"enum": ["NCHW", "NHWC"]}
    props["resample"] = {"enum": ["nearest", "bilinear", "bicubic", "lanczos"]}
    props["fov_threshold"].update(exclusiveMinimum=0, exclusiveMaximum=1)
    props["fov_min_fraction"].update(minimum=0.1, maximum=1)
    return {"description": "runtime/preprocess.py: PreprocessSpec, every parameter recorded", "type": "object",
            "properties": props, "required": list(props), "additionalProperties": False}


PREPROCESSING = Codec(_parse_preprocessing, lambda s: s.to_dict(), _preprocessing_schema())


def _parse_quality(v: Any, where: str) -> QualitySpec:
    if not isinstance(v, dict):
        fail(where, "must be an object")
    measures = v.get("measures", {})
    if isinstance(measures, dict):
        for name, entry in measures.items():
            for k, x in (entry.items() if isinstance(entry, dict) else ()):
                if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
                    fail(f"{where}.measures.{name}.{k}", f"must be a number or null, got {x!r}")
    if "source" in v and not isinstance(v["source"], str):
        fail(f"{where}.source", "must be a string")
    try:
        return QualitySpec.from_dict(v)
    except UsageError as exc:
        fail(where, str(exc))


_BOUND = {"anyOf": [{"type": "number"}, {"type": "null"}]}
QUALITY = Codec(_parse_quality, lambda s: s.to_dict(), {
    "description": "runtime/quality.py: QualitySpec (measures it does not list keep their defaults)",
    "type": "object", "additionalProperties": False,
    "properties": {"version": {"const": 1}, "size": {"type": "integer", "minimum": 64, "maximum": 1024},
                   "enabled": {"type": "boolean"}, "source": {"type": "string"},
                   "measures": {"type": "object", "additionalProperties": False, "properties": {
                       m: {"type": "object", "additionalProperties": False,
                           "properties": {"min": _BOUND, "max": _BOUND,
                                          "scale": {"type": "number", "exclusiveMinimum": 0}}}
                       for m in MEASURES}}}})


@dataclass(frozen=True)
class Producer:
    """What built the bundle: fundus-edge, Python and the platform, plus the versions of the packages used."""

    fundus_edge: str
    python: str
    platform: str
    packages: Mapping[str, str] = dataclasses.field(default_factory=dict)  # distribution name -> version

    @classmethod
    def from_dict(cls, data: Any, where: str = "producer") -> Producer:
        """From the flat JSON form (``pipeline/build.py: producer_versions()``)."""
        return _parse_producer(data, where)

    def to_dict(self) -> dict[str, str]:
        return {"fundus_edge": self.fundus_edge, "python": self.python, "platform": self.platform, **self.packages}


_PRODUCER_KEYS = ("fundus_edge", "python", "platform")


def _parse_producer(v: Any, where: str) -> Producer:
    if not isinstance(v, dict):
        fail(where, "must be an object")
    for k, x in v.items():
        if not isinstance(x, str):
            fail(f"{where}.{k}", f"must be a version string, got {x!r}")
    for k in _PRODUCER_KEYS:
        if k not in v:
            fail(f"{where}.{k}", "is missing")
    return Producer(v["fundus_edge"], v["python"], v["platform"],
                    {k: x for k, x in v.items() if k not in _PRODUCER_KEYS})


PRODUCER = Codec(_parse_producer, lambda p: p.to_dict(),
                 {"description": Producer.__doc__, "type": "object", "required": list(_PRODUCER_KEYS),
                  "additionalProperties": {"type": "string"}})
