"""Load a PyTorch model from anywhere: an ``nn.Module``, a checkpoint + architecture, TorchScript, or
``torch.export`` (.pt2) files.

Architectures are named ``torchvision:<name>`` (any torchvision classification model) or
``fundus-edge:<name>`` (the kit's reference architectures).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, UsageError

REFERENCE_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights"
DEFAULT_REFERENCE = "dr-resnet18s"


@dataclass
class LoadedModel:
    """An eval-mode module plus what the checkpoint said about itself (class names, preprocessing...)."""

    module: nn.Module
    source: str
    arch: str | None = None
    num_classes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def build_architecture(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate an architecture by name, with fresh weights."""
    if ":" not in arch:
        raise UsageError(f"architecture {arch!r} needs a namespace: 'torchvision:{arch}' or 'fundus-edge:{arch}'")
    ns, name = arch.split(":", 1)
    if ns == "torchvision":
        import torchvision

        available = set(torchvision.models.list_models(module=torchvision.models))
        if name not in available:
            close = sorted(a for a in available if name[:4] in a)[:5]
            raise UsageError(f"torchvision has no classification model {name!r}" +
                             (f"; did you mean {', '.join(close)}?" if close else ""))
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if ns == "fundus-edge":
        from ..models.reference import ARCHITECTURES

        if name not in ARCHITECTURES:
            raise UsageError(f"unknown fundus-edge architecture {name!r}; known: {sorted(ARCHITECTURES)}")
        return ARCHITECTURES[name](num_classes=num_classes, **kwargs)
    raise UsageError(f"unknown architecture namespace {ns!r} in {arch!r}; use torchvision: or fundus-edge:")


def _unwrap_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and obj.get("fundus_edge_checkpoint"):
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "fundus_edge_checkpoint")}
        obj = obj["state_dict"]
    elif isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError("the checkpoint holds no state_dict (a dict of tensors)")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    return sd, meta


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    """Load with every mismatch listed: missing keys, unexpected keys, shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        parts = [f"the checkpoint does not match architecture {arch}:"]

        def listed(title: str, items: list[str]) -> None:
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"  {title} ({len(items)}): {', '.join(items[:8])}{more}")

        listed("missing keys", missing)
        listed("unexpected keys", unexpected)
        listed("shape mismatches", shapes)
        parts.append("  check --arch and --num-classes against how the model was trained")
        raise ModelLoadError("\n".join(parts))
    module.load_state_dict(state_dict, strict=True)


def load_model(source: str | Path | nn.Module, arch: str | None = None, num_classes: int | None = None,
               arch_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Load a model for export. ``source`` may be a module, a path, or ``reference:<name>``."""
    if isinstance(source, nn.Module):
        return LoadedModel(source.eval(), source=type(source).__name__, arch=arch, num_classes=num_classes)
    text = str(source)
    if text.startswith("reference:"):
        name = text.split(":", 1)[1] or DEFAULT_REFERENCE
        path = REFERENCE_WEIGHTS / f"{name}.pt"
        if not path.is_file():
            known = sorted(p.stem for p in REFERENCE_WEIGHTS.glob("*.pt"))
            raise UsageError(f"no shipped reference model {name!r}; shipped: {known}")
    else:
        path = Path(text)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    if path.suffix == ".pt2":
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a loadable torch.export (.pt2) file: {exc}") from exc
        return LoadedModel(ep.module(), source=str(path), arch=arch, num_classes=num_classes)
    if _is_torchscript(path):
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path} looks like TorchScript but does not load: {exc}") from exc
        return LoadedModel(scripted.eval(), source=str(path), arch=arch, num_classes=num_classes)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read {path} as a checkpoint ({type(exc).__name__}: {exc}). fundus-edge loads state_dicts "
            "with weights_only=True; save with torch.save(model.state_dict(), path), or pass TorchScript/.pt2"
        ) from exc
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only=True never returns modules
        return LoadedModel(obj.eval(), source=str(path), arch=arch, num_classes=num_classes)
    state_dict, meta = _unwrap_state_dict(obj)
    arch = arch or meta.get("arch")
    num_classes = num_classes or meta.get("num_classes")
    if not arch:
        raise UsageError(f"{path} is a state_dict: name its architecture with --arch "
                         "(e.g. torchvision:resnet18 or fundus-edge:resnet18s)")
    if not num_classes:
        raise UsageError(f"{path} is a state_dict: give --num-classes")
    kwargs = dict(meta.get("arch_kwargs", {})) if arch == meta.get("arch") else {}
    kwargs.update(arch_kwargs or {})
    module = build_architecture(arch, int(num_classes), **kwargs)
    load_state_dict_strict(module, state_dict, arch)
    return LoadedModel(module.eval(), source=str(path), arch=arch, num_classes=int(num_classes), meta=meta)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
