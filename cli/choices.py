"""Shared choices of the screening commands: artifact, backend settings, the decode/infer pipeline."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

from ..errors import UsageError


def backend_settings(args: argparse.Namespace) -> Any:
    from ..runtime.backends import BackendSettings

    return BackendSettings(threads=args.threads)


def screen_choices(args: argparse.Namespace, get_bundle: Callable[[], Any]) -> tuple[str | None, str | None, Any]:
    """Artifact id, format and backend settings for ``screen`` from --artifact, --format, --backend, --device
    and --threads. ``get_bundle`` gives the (verified) bundle, needed only when a device profile picks."""
    from ..runtime.backends import FORMATS_BY_BACKEND, BackendSettings

    fmt = args.format
    if args.backend:
        if fmt and FORMATS_BY_BACKEND[args.backend] != fmt:
            raise UsageError(f"--backend {args.backend} runs {FORMATS_BY_BACKEND[args.backend]} files, "
                             f"not --format {fmt}")
        fmt = FORMATS_BY_BACKEND[args.backend]
    artifact, settings = args.artifact, None
    device = args.device
    if device is None and getattr(args, "device_config", None):  # the [device] profile of --device-config
        from ..devices.config import profile_from_device_config

        device = profile_from_device_config(args.device_config)
    if device:  # the device profile picks the artifact (unless given) and the backend settings
        from ..devices import resolve_device
        from ..devices.choice import choose_artifact, runnable_formats

        profile = resolve_device(device)
        bundle = get_bundle()
        if not (artifact or fmt or args.precision):
            artifact = choose_artifact(profile, bundle.artifacts, bundle.spec, runnable_formats()).artifact_id
        settings = profile.backend_settings(threads=args.threads)
    if settings is None:
        settings = BackendSettings(threads=1 if args.threads is None else args.threads)
    return artifact, fmt, settings


def decode_limits_for(args: argparse.Namespace) -> Any:
    """The per-image decode limits for ``screen``: the device profile's memory budget with --device (or the
    [device] profile of --device-config), else the defaults of runtime/decode_limits.py."""
    from ..runtime.decode_limits import DecodeLimits

    device = getattr(args, "device", None)
    if device is None and getattr(args, "device_config", None):
        from ..devices.config import profile_from_device_config

        device = profile_from_device_config(args.device_config)
    if not device:
        return DecodeLimits()
    from ..devices import resolve_device

    return DecodeLimits.for_budget_mb(resolve_device(device).memory.budget_mb())


def use_pipeline(choice: str, n_images: int, cores: int | None = None) -> bool:
    """Whether ``screen`` overlaps decoding of the next image with inference of this one (``--pipeline``).

    ``auto``: only for more than one image on a machine with at least two cores (with one core the two stages
    just take turns)."""
    if choice in ("on", "off"):
        return choice == "on"
    return n_images > 1 and (cores if cores is not None else (os.cpu_count() or 1)) >= 2


def pipeline_settings(settings: Any, pipeline: bool) -> Any:
    """Backend settings for a pipelined batch: onnxruntime's idle intra-op threads stop spinning when inference
    runs on more than one thread, so that they leave a core to the decoding worker (measured on 2 cores,
    ResNet-18 int8, 2 threads: pipelined 0.94x serial with spinning, 1.17x without; README, Speed)."""
    if pipeline and settings.threads != 1 and settings.allow_spinning is None:
        return dataclasses.replace(settings, allow_spinning=False)
    return settings
