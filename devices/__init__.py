"""Device profiles (data), auto-detection, ``doctor``, the emulated-device harness and offline packages.

Torch-free like the runtime: nothing here imports torch, onnx or a converter.
"""

from __future__ import annotations

from .choice import ArtifactChoice, choose_artifact
from .detect import Detection, detect
from .profile import ArtifactPreference, DeviceProfile, get_profile, list_profiles


def resolve_device(name: str) -> DeviceProfile:
    """A profile by name or file; ``auto`` detects this machine's (warnings go to stderr)."""
    if name != "auto":
        return get_profile(name)
    import sys

    found = detect()
    for w in found.warnings:
        print(f"fundus-edge: warning: {w}", file=sys.stderr)
    return found.profile


__all__ = ["ArtifactChoice", "ArtifactPreference", "Detection", "DeviceProfile", "choose_artifact", "detect",
           "get_profile", "list_profiles", "resolve_device"]
