"""The segmentation parts of the manifest: what a per-pixel output means, and the dense preprocessing codec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UsageError
from ..runtime.dense import DensePreprocessSpec
from ._typed import Codec, JsonRecord, fail, spec


@dataclass(frozen=True, kw_only=True)
class SegmentationMeaning(JsonRecord):
    """What a segmentation model's output means: per-pixel logits ``[N, channels, H, W]``; the vessel
    probability is the sigmoid of channel ``vessel_channel``; a pixel is vessel when it is >= ``threshold``."""

    kind: Literal["pixel-logits"] = spec()
    activation: Literal["sigmoid"] = spec()
    channels: int = spec(ge=1)
    vessel_channel: int = spec(ge=0)
    threshold: float = spec(ge=0.0, le=1.0)
    class_names: tuple[str, ...] = spec(min_len=1, pattern=r"\S(?:.*\S)?")

    @property
    def positive_classes(self) -> tuple[int, ...]:
        return (self.vessel_channel,)

    def _check(self, where: str) -> None:
        if self.vessel_channel >= self.channels:
            fail(f"{where}.vessel_channel", f"is {self.vessel_channel}, but the output has {self.channels} channel(s)")
        if len(self.class_names) != self.channels:
            fail(f"{where}.class_names", f"names {len(self.class_names)} channels for {self.channels}")


def _parse_dense(v: Any, where: str) -> DensePreprocessSpec:
    if not isinstance(v, dict):
        fail(where, "must be an object")
    try:
        return DensePreprocessSpec.from_dict(v)
    except (UsageError, TypeError) as exc:
        fail(where, str(exc))


def _dense_schema() -> dict[str, Any]:
    return {"description": "runtime/dense.py: DensePreprocessSpec (segmentation bundles)", "type": "object",
            "properties": {k: {} for k in DensePreprocessSpec.__dataclass_fields__}, "additionalProperties": False}


DENSE = Codec(_parse_dense, lambda s: s.to_dict(), _dense_schema())
