"""Which of a bundle's artifacts a device runs: the profile's preferences, the gate's verdicts, and the backends
installed here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import DeviceError
from .profile import BACKEND_FOR_FORMAT, DeviceProfile

if TYPE_CHECKING:
    from ..bundle.manifest import Manifest


@dataclass(frozen=True)
class ArtifactChoice:
    """Which artifact of a bundle a device runs, and why. ``degraded``: not the profile's first preference."""

    artifact_id: str
    format: str
    precision: str
    reason: str
    degraded: bool
    skipped: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdicts(manifest: Manifest | Mapping[str, Any] | None) -> tuple[Mapping[str, bool], str | None]:
    """(artifact id -> gate passed, default artifact); the reference is absent from the verdicts: it passes."""
    from ..bundle.manifest import Manifest  # here: profiles are data, importable without numpy

    if isinstance(manifest, Manifest):
        summary = manifest.gate.summary if manifest.gate is not None else {}
        # INSUFFICIENT EVIDENCE (no harm seen, margins not shown) counts only when the publisher allowed it
        allowed = manifest.gate is not None and bool(manifest.gate.allow_insufficient_evidence)
        return {aid: g.passed or (allowed and g.verdict == "INSUFFICIENT EVIDENCE") for aid, g in summary.items()}, \
            manifest.default_artifact
    if manifest and "schema" in manifest:  # transition: cli/main.py still passes the JSON form (bundle.manifest)
        return _verdicts(Manifest.from_dict(dict(manifest)))
    if not all(isinstance(v, bool) for v in (manifest or {}).values()):  # a partial manifest would read as "passed"
        raise TypeError("choose_artifact takes the typed Manifest, or gate verdicts as {artifact id: passed}")
    return dict(manifest or {}), None


def choose_artifact(profile: DeviceProfile, artifacts: Sequence[Any],
                    manifest: Manifest | Mapping[str, Any] | None = None,
                    runnable_formats: Iterable[str] | None = None, default: str | None = None) -> ArtifactChoice:
    """The first of the profile's preferences that the bundle has (gate passed, backend available here).

    ``artifacts``: objects or dicts with ``id``, ``format`` and ``precision``. ``manifest``: the bundle's typed
    manifest (its gate verdicts and default artifact), or at build time the verdicts alone (artifact id -> passed).
    When no preference matches, the default artifact is used and the reason says so.
    """
    def get(a: Any, k: str) -> str:
        return str(a[k] if isinstance(a, dict) else getattr(a, k))

    verdicts, manifest_default = _verdicts(manifest)
    runnable = set(runnable_formats) if runnable_formats is not None else None
    skipped: list[str] = []
    for rank, pref in enumerate(profile.runtime.artifacts):
        for a in artifacts:
            if get(a, "format") != pref.format or get(a, "precision") != pref.precision:
                continue
            aid = get(a, "id")
            if not verdicts.get(aid, True):
                skipped.append(f"{aid}: failed the clinical gate")
                continue
            if runnable is not None and pref.format not in runnable:
                skipped.append(f"{aid}: no {BACKEND_FOR_FORMAT[pref.format]} backend installed here")
                continue
            if rank == 0:
                reason = f"{profile.name} prefers {pref}"
            else:
                missing = ", ".join(str(p) for p in profile.runtime.artifacts[:rank])
                reason = (f"{profile.name} prefers {missing}; the bundle has no usable one, so it runs {pref} "
                          f"(choice {rank + 1} of {len(profile.runtime.artifacts)})")
            return ArtifactChoice(aid, pref.format, pref.precision, reason, rank > 0, tuple(skipped))
    default = default or manifest_default
    for a in artifacts:
        if get(a, "id") == default and (runnable is None or get(a, "format") in runnable):
            return ArtifactChoice(default, get(a, "format"), get(a, "precision"),
                                  f"none of {profile.name}'s preferred artifacts "
                                  f"({', '.join(map(str, profile.runtime.artifacts))}) is usable in this bundle; "
                                  f"using the bundle default {default}", True, tuple(skipped))
    raise DeviceError(f"no artifact of this bundle can run on {profile.name}: it prefers "
                      f"{', '.join(map(str, profile.runtime.artifacts))}; "
                      f"the bundle has {[get(a, 'id') for a in artifacts]} ({'; '.join(skipped) or 'none usable'})")


def runnable_formats() -> set[str]:
    """Artifact formats whose backend is installed here (found, not imported): {"tflite"} in a [litert] install."""
    from ..runtime.backends import installed_formats

    return installed_formats()
