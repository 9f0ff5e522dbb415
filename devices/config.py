"""The device config (``device.toml``) that ``fundus-edge package`` writes and ``screen --device-config`` reads.

Two tables: ``[device]`` (the profile, the artifact chosen for it, threads, provider order; read here) and
``[security]`` (``trusted_keys``, ``require_signature``; read by :class:`fundus_edge.bundle.signing.TrustPolicy`).
Each reader ignores the other's table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UsageError


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def render_device_config(device: dict[str, Any], security: dict[str, Any] | None = None,
                         comment: str = "") -> str:
    lines = [f"# {line}" for line in comment.splitlines()]
    for name, table in (("device", device), ("security", security)):
        if table:
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def read_device_table(path: str | os.PathLike[str]) -> dict[str, Any]:
    from .profile import read_toml

    p = Path(path)
    table = read_toml(p, UsageError, "the device config").get("device", {})
    if not isinstance(table, dict):
        raise UsageError(f"{p}: [device] must be a table")
    return table


def profile_from_device_config(path: str | os.PathLike[str]) -> str | None:
    """The ``profile`` named in the config's ``[device]`` table, if any."""
    profile = read_device_table(path).get("profile")
    if profile is not None and not isinstance(profile, str):
        raise UsageError(f"{path}: [device] profile must be a device name")
    return profile
