"""Image quality: is this photograph a gradable fundus image? Cheap rule-based measures, numpy + Pillow only.

The measures are computed on the quality crop that :func:`~fundus_edge.runtime.preprocess.preprocess` cuts
from the same decoded image as the network input: the square around the detected field of view, at
:attr:`QualitySpec.size` pixels (224 by default, the default network size, so the network's crop is reused;
other network sizes get their own crop at this size, so the thresholds do not depend on the model). Inside the
field of view (quarter resolution for exposure and colour, half for contrast and vessels, full for noise and
focus):

====================  ======================================================================================
``fov_found``         1 when a circular field of view was detected, else 0
``fov_size``          the detected circle's diameter / the frame's short side (small when only a small pupil
                      lets light in)
``fov_centring``      distance of the circle's centre from the frame's centre, in circle radii
``fov_visible``       fraction of the circle that lies inside the frame
``fov_border``        brightness outside the circle / inside it (a fundus camera's circle sits on black; 0 when the
                      frame lies inside the field of view, detector reason ``frame-inside-fov``: no surround)
``brightness``        mean luma, 0..1 (bounded below and above: under- and over-exposure)
``saturated``         fraction that is burnt out (luma >= 235)
``dark_area``         fraction of 16-px blocks darker than 30 % of the 90th-percentile block: shadows of a
                      small pupil, eyelashes, a misaligned eye
``noise``             sensor-noise sigma of the green channel in grey levels (Immerkær's kernel, lower half)
``contrast``          local contrast of the green channel: RMS of its 16-px block standard deviations / mean
``sharpness``         re-blur focus measure (after Crété-Roffet et al. 2007): on the strongest coarse-scale
                      edges, the share of fine-scale gradient that a further blur removes; the least over four
                      directions, so motion blur counts; contrast cancels out, noise does not pick the edges
``isotropy``          how evenly the fine detail (fine minus coarse image) runs in all directions: the small over
                      the large eigenvalue of its structure tensor, 0..1; camera shake smears it one way (low),
                      a soft but steady photograph keeps it near 1
``vessels``           vessel visibility: 98th percentile of the green channel's black top-hat / local level
``red_share``         R / (R + G + B) of lit pixels
``channel_order``     fraction of lit pixels with R >= G >= B
``hue_spread``        chroma-weighted circular standard deviation of the hue, in degrees (bounded below too: a
                      retina is never one uniform tint)
====================  ======================================================================================

Each measure has bounds (``min``/``max``) in the :class:`QualitySpec`, which lives in the bundle manifest
(``quality``); a bundle without it gets :data:`DEFAULT_BOUNDS`. An image is gradable when every measure is
inside its bounds. The combined score is ``sigmoid(min_i margin_i)`` where ``margin_i`` is the distance to the
nearest bound in units of the measure's ``scale``: it is >= 0.5 exactly when the image is gradable, and ranks
images by their weakest measure.

Darkness is guarded first: the relative measures divide by a floored brightness, and a dark image fails on
``brightness`` whatever its other measures say (a very dark, noisy frame can look vessel-rich); the reasons
then start with darkness and the hint speaks of light, not focus.

Colour and thresholds do not transfer between cameras: calibrate them per camera with
``fundus-edge quality calibrate --good DIR --bad DIR`` (``quality_calibration.py``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import UsageError
from .preprocess import Preprocessed, PreprocessSpec, preprocess
from .quality_measures import compute_measures

QUALITY_SPEC_VERSION = 1


@dataclass(frozen=True)
class Bounds:
    """Acceptable range of one measure; ``scale`` converts a distance to a bound into margin units."""

    min: float | None = None
    max: float | None = None
    scale: float = 1.0

    def margin(self, value: float) -> float:
        """Signed distance to the nearest bound in units of ``scale``: >= 0 inside, < 0 outside. +inf: no bound."""
        m = math.inf
        if self.min is not None:
            m = min(m, (value - self.min) / self.scale)
        if self.max is not None:
            m = min(m, (self.max - value) / self.scale)
        return m

    def to_dict(self) -> dict[str, float | None]:
        return {"min": self.min, "max": self.max, "scale": self.scale}


@dataclass(frozen=True)
class MeasureInfo:
    """What a measure means and what to tell the operator when it fails."""

    group: str
    too_low: str
    too_high: str


# What to tell the operator, by failure group. The hint comes from the first failing group in this order:
# exposure first (it also distorts colour, contrast and noise), framing (a misplaced circle spoils the surround
# measure), "not a fundus" when the evidence is strong, then shadows (small pupil), noise, haze and focus.
HINTS: dict[str, str] = {
    "dark": "Too dark: check that the lens is uncovered and aimed at the pupil, dim the room, wait for the pupil to "
            "widen (or use the small-pupil mode), raise the illumination and retake while the patient is here.",
    "bright": "Over-exposed or washed out: lower the flash or illumination, avoid reflections and retake while "
              "the patient is here.",
    "framing": "The retina is not centred in the frame: re-align the camera on the pupil and retake while the "
               "patient is here.",
    "not-fundus": "This does not look like a fundus photograph: check that the lens is uncovered and pointed at "
                  "the pupil, then retake while the patient is here.",
    "shadow": "Part of the retina is dark or shadowed (small pupil, eyelashes or misalignment): wait for the pupil "
              "to widen, hold the eyelid open, re-align on the pupil and retake while the patient is here.",
    "noise": "Too noisy: add light rather than gain, hold the camera still and retake while the patient is here.",
    "haze": "Low contrast (flare, haze or a dirty lens): clean the lens, re-align to avoid reflections and retake "
            "while the patient is here.",
    "focus": "Out of focus or shaken: refocus, steady the camera and retake while the patient is here.",
}

MEASURES: dict[str, MeasureInfo] = {
    "fov_found": MeasureInfo("not-fundus", "no circular field of view found", "-"),
    "fov_border": MeasureInfo("not-fundus", "-", "no dark surround around the field of view"),
    "red_share": MeasureInfo("not-fundus", "not red enough for a retina", "implausibly red for this camera"),
    "channel_order": MeasureInfo("not-fundus", "colours not ordered red > green > blue like a retina", "-"),
    "hue_spread": MeasureInfo("not-fundus", "one uniform tint, not a retina", "too many different hues for a retina"),
    "fov_size": MeasureInfo("shadow", "the lit field of view is small (small pupil?)", "-"),
    "fov_centring": MeasureInfo("framing", "-", "the field of view is off-centre"),
    "fov_visible": MeasureInfo("framing", "the field of view runs out of the frame", "-"),
    "brightness": MeasureInfo("dark", "under-exposed (too dark)", "over-exposed (too bright)"),  # or "bright"
    "saturated": MeasureInfo("bright", "-", "burnt-out areas"),
    "dark_area": MeasureInfo("shadow", "-", "part of the field of view is in shadow"),
    "noise": MeasureInfo("noise", "-", "too much sensor noise"),
    "contrast": MeasureInfo("haze", "low contrast (haze or flare)", "-"),
    "sharpness": MeasureInfo("focus", "blurred (out of focus or shaken)", "-"),
    "isotropy": MeasureInfo("focus", "smeared in one direction (camera shake)", "-"),
    "vessels": MeasureInfo("focus", "vessels not visible", "-"),
}

# Tuned on synthetic degradations of three synthetic camera profiles, then fitted to real cameras: the open-fundus
# photographs of three cameras (IDRiD, HRF, CHASE_DB1), full frame, cropped inside the field of view, and
# darker/browner (benchmarks/quality_study.py --real, docs/quality.md). Fitted on IDRiD train and half of HRF
# and CHASE_DB1 (`fit_bounds` there): sharpness and isotropy at the 0.5th percentile of those photos' good
# variants (camera shake is told by isotropy, so sharpness only needs to refuse defocus), brightness at 0.9 x
# the lowest 1st percentile of a camera and variant; dark_area tightened to 0.05 (real photographs: 99th
# percentile 0.018) so shadows and eyelashes are refused by the shadow measure, not by the focus bound.
# Calibrate per camera: colour and focus in particular do not transfer.
DEFAULT_BOUNDS: dict[str, Bounds] = {
    "fov_found": Bounds(min=0.5, scale=0.05),
    "fov_border": Bounds(max=0.15, scale=0.05),
    "red_share": Bounds(min=0.42, scale=0.03),
    "channel_order": Bounds(min=0.9, scale=0.025),
    "hue_spread": Bounds(min=0.7, max=12.0, scale=3.0),
    "fov_size": Bounds(min=0.75, scale=0.08),
    "fov_centring": Bounds(max=0.25, scale=0.08),
    "fov_visible": Bounds(min=0.6, scale=0.1),
    "brightness": Bounds(min=0.11, max=0.65, scale=0.05),
    "saturated": Bounds(max=0.1, scale=0.05),
    "dark_area": Bounds(max=0.05, scale=0.05),
    "noise": Bounds(max=2.0, scale=0.4),
    "contrast": Bounds(min=0.04, scale=0.015),
    "sharpness": Bounds(min=0.143, scale=0.03),
    "isotropy": Bounds(min=0.484, scale=0.1),
    "vessels": Bounds(min=0.08, scale=0.04),
}


@dataclass(frozen=True)
class QualitySpec:
    """Everything the quality check needs; serialised into the bundle manifest as ``quality``.

    The default bounds are for the default ``size`` (224 px): the focus and noise measures depend on the
    crop's scale, so a spec with another size needs its own calibration.
    """

    size: int = 224
    enabled: bool = True
    bounds: Mapping[str, Bounds] = field(default_factory=lambda: dict(DEFAULT_BOUNDS))
    source: str = "defaults (synthetic degradations; real photographs of 3 cameras: IDRiD, HRF, CHASE_DB1)"

    def __post_init__(self) -> None:
        if not 64 <= self.size <= 1024:
            raise UsageError(f"quality size must be 64..1024 pixels, got {self.size}")
        unknown = set(self.bounds) - set(MEASURES)
        if unknown:
            raise UsageError(f"unknown quality measures {sorted(unknown)}; this runtime knows {sorted(MEASURES)}")
        for name, b in self.bounds.items():
            if not (math.isfinite(b.scale) and b.scale > 0):
                raise UsageError(f"quality measure {name}: scale must be a finite number > 0, got {b.scale}")
            if any(v is not None and not math.isfinite(v) for v in (b.min, b.max)):
                raise UsageError(f"quality measure {name}: bounds must be finite numbers or null")
            if b.min is not None and b.max is not None and b.min > b.max:
                raise UsageError(f"quality measure {name}: min {b.min} is above max {b.max}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": QUALITY_SPEC_VERSION, "size": self.size, "enabled": self.enabled, "source": self.source,
                "measures": {k: self.bounds[k].to_dict() for k in MEASURES if k in self.bounds}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QualitySpec:
        """Read a spec; measures it does not list keep their defaults, fields it lists override them."""
        if not isinstance(data, Mapping):
            raise UsageError("a quality spec must be a JSON object")
        known = {"version", "size", "enabled", "source", "measures"}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown quality spec fields {sorted(unknown)}; known: {sorted(known)}")
        version = data.get("version", QUALITY_SPEC_VERSION)
        if version != QUALITY_SPEC_VERSION:
            raise UsageError(f"quality spec version {version} is not supported (this runtime reads "
                             f"{QUALITY_SPEC_VERSION}); upgrade fundus-edge")
        measures = data.get("measures", {})
        if not isinstance(measures, Mapping):
            raise UsageError("quality spec 'measures' must map measure names to {min, max, scale}")
        bounds = dict(DEFAULT_BOUNDS)
        if "sharpness" in measures and "isotropy" not in measures:
            del bounds["isotropy"]  # a spec from before isotropy: its sharpness bound also refuses camera shake
        for name, entry in measures.items():
            if name not in MEASURES:
                raise UsageError(f"unknown quality measure {name!r}; this runtime knows {sorted(MEASURES)}")
            if not isinstance(entry, Mapping) or set(entry) - {"min", "max", "scale"}:
                raise UsageError(f"quality measure {name}: expected an object with min, max and scale")
            base = bounds[name]
            try:
                bounds[name] = Bounds(
                    min=_opt_float(entry["min"]) if "min" in entry else base.min,
                    max=_opt_float(entry["max"]) if "max" in entry else base.max,
                    scale=float(entry.get("scale", base.scale)),
                )
            except (TypeError, ValueError) as exc:
                raise UsageError(f"quality measure {name}: bounds must be numbers or null ({exc})") from exc
        size, enabled = data.get("size", 224), data.get("enabled", True)
        if not isinstance(size, int) or isinstance(size, bool) or not isinstance(enabled, bool):
            raise UsageError("quality spec: 'size' must be an integer and 'enabled' true or false")
        default_source = cls.__dataclass_fields__["source"].default
        return cls(size=size, enabled=enabled, bounds=bounds,
                   source=str(data.get("source", "custom" if data else default_source)))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def load_quality_spec(path: str | os.PathLike[str]) -> QualitySpec:
    """Read a quality spec JSON file (as written by ``fundus-edge quality calibrate --out``)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the quality spec {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the quality spec {path} is not valid JSON ({exc})") from exc
    return QualitySpec.from_dict(data)


@dataclass
class QualityResult:
    """The quality of one image. Truthy when it is gradable (no measure out of bounds)."""

    measures: dict[str, float]
    margins: dict[str, float]
    failed: list[str]
    score: float
    reasons: list[str]
    hint: str | None
    timings_ms: float = 0.0

    def __bool__(self) -> bool:
        return not self.failed

    @property
    def gradable(self) -> bool:
        return bool(self)

    def to_dict(self) -> dict[str, Any]:
        return {"gradable": self.gradable, "score": round(self.score, 4), "failed": list(self.failed),
                "reasons": list(self.reasons), "hint": self.hint,
                "measures": {k: round(v, 4) for k, v in self.measures.items()}}


def judge(measures: Mapping[str, float], spec: QualitySpec) -> QualityResult:
    """Compare measures with the spec's bounds: failed measures, reasons, hint and the combined score."""
    margins: dict[str, float] = {}
    failed: list[str] = []
    for name in MEASURES:
        b = spec.bounds.get(name)
        if b is None or name not in measures:
            continue
        mg = b.margin(measures[name])
        if math.isnan(mg):  # an unmeasurable image is not gradable
            mg = -math.inf
        margins[name] = mg
        if mg < 0:
            failed.append(name)
    worst = min((v for v in margins.values() if v != math.inf), default=10.0)
    score = 1.0 / (1.0 + math.exp(-max(min(worst, 30.0), -30.0)))
    groups = {n: _group(n, measures[n], spec.bounds[n]) for n in failed}
    # "Not a fundus" needs strong evidence: no dark surround, or two colour measures out. One colour measure
    # alone is as likely a washed-out or tinted retina, better explained by the other failures.
    not_fundus = [n for n in failed if groups[n] == "not-fundus"]
    strong = len(not_fundus) >= 2 or bool({"fov_found", "fov_border"} & set(not_fundus))
    order = list(HINTS)

    def rank(n: str) -> tuple[int, int]:
        g = groups[n]
        weak = g == "not-fundus" and not strong
        return (len(order) if weak else order.index(g), list(MEASURES).index(n))

    failed.sort(key=rank)  # the darkness guard: a dark frame is reported as dark, not as blurred or noisy
    reasons = []
    for n in failed:
        b = spec.bounds[n]
        low = b.min is not None and measures[n] < b.min
        info = MEASURES[n]
        text = info.too_low if low else info.too_high
        if text == "-":  # a bound on a side the defaults leave open (a calibrated spec may set one)
            text = "too low" if low else "too high"
        reasons.append(f"{n}: {text} "
                       f"({measures[n]:.3g} {'<' if low else '>'} {b.min if low else b.max:.3g})")
    hint = HINTS[groups[failed[0]]] if failed else None
    return QualityResult(dict(measures), margins, failed, score, reasons, hint)


def _group(name: str, value: float, bounds: Bounds) -> str:
    if name == "brightness":
        return "dark" if bounds.min is not None and value < bounds.min else "bright"
    return MEASURES[name].group


def assess(pre: Preprocessed, spec: QualitySpec) -> QualityResult:
    """Judge the quality of a preprocessed image (``preprocess(..., quality_size=spec.size)``)."""
    t0 = time.perf_counter()
    image = pre.quality_image
    if image is None or image.size[0] != spec.size:
        raise UsageError(f"preprocess the image with quality_size={spec.size} before assessing its quality")
    result = judge(compute_measures(image, pre.fov, pre.decoded_size), spec)
    result.timings_ms = (time.perf_counter() - t0) * 1e3
    return result


def assess_source(source: str | os.PathLike[str] | bytes | Image.Image, spec: QualitySpec,
                  preprocessing: PreprocessSpec | None = None) -> tuple[QualityResult, Preprocessed]:
    """Decode, preprocess and judge one image. Raises :class:`~fundus_edge.errors.ImageError` for bad files."""
    pre = preprocess(source, preprocessing or PreprocessSpec(), quality_size=spec.size)
    return assess(pre, spec), pre


__all__ = ["DEFAULT_BOUNDS", "HINTS", "MEASURES", "Bounds", "QualityResult", "QualitySpec", "assess",
           "assess_source", "compute_measures", "judge", "load_quality_spec"]
