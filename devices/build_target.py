"""``build --device``: the target device's preferred artifact becomes the bundle default; its settings go into
the manifest (an optional ``device`` entry, ignored by runtimes that do not know it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .choice import choose_artifact
from .profile import get_profile


def device_default(device: str, artifacts: Sequence[dict[str, Any]], gates: Sequence[Any], default: str,
                   log: Callable[[str], None], allow_insufficient: bool = False) -> tuple[str, dict[str, Any]]:
    """(default artifact id, manifest ``device`` entry) for ``device``, given the built artifacts and gates
    (``allow_insufficient``: an INSUFFICIENT EVIDENCE verdict counts as usable, as the publisher allowed)."""
    profile = get_profile(device)
    verdicts = {g.artifact: bool(g.passed) or (allow_insufficient and g.verdict == "INSUFFICIENT EVIDENCE")
                for g in gates}
    choice = choose_artifact(profile, artifacts, verdicts, default=default)
    built = {(a["format"], a["precision"]) for a in artifacts}
    not_built = [str(p) for p in profile.runtime.artifacts if (p.format, p.precision) not in built]
    log(f"      device {profile.name}: default artifact {choice.artifact_id} ({choice.reason})"
        + (f"; not built here: {', '.join(not_built)}" if not_built else ""))
    entry = {"profile": profile.name, "artifact": choice.artifact_id, "reason": choice.reason,
             "threads": profile.runtime.threads, "providers": list(profile.runtime.providers),
             "latency_budget_ms": profile.runtime.latency_budget_ms, "not_built": not_built}
    return choice.artifact_id, entry
