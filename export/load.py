"""Load a PyTorch model from anywhere: an ``nn.Module``, a checkpoint + architecture, TorchScript, or
``torch.export`` (.pt2) files.

Architectures are named ``torchvision:<name>`` (any torchvision classification model) or
``fundus-edge:<name>`` (the kit's reference architectures).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, UsageError

PT2_META_FILE = "fundus_edge.json"  # optional metadata in a .pt2: torch.export.save(ep, f, extra_files={...})
REFERENCE_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights"
DEFAULT_REFERENCE = "dr-resnet18s"


@dataclass
class LoadedModel:
    """An eval-mode module plus what the checkpoint said about itself (class names, preprocessing...).

    For a ``torch.export`` file, ``module`` is an :class:`ExportedProgramModule` and ``program`` the program.
    """

    module: nn.Module
    source: str
    arch: str | None = None
    num_classes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    program: torch.export.ExportedProgram | None = None


class ExportedProgramModule(nn.Module):
    """The ``nn.Module`` face of a ``torch.export`` program, so that every consumer of a module can take one.

    A program's train/eval behaviour was fixed when it was exported (its module refuses ``.eval()``), so
    ``train()``/``eval()`` here only set the flag. ``forward`` runs the program; a program exported with a
    fixed batch (the usual ``torch.export.export(model, (torch.randn(1, 3, H, W),))``) runs any batch in
    pieces of that size. :meth:`exportable` gives a graph module without the program's input guards, for the
    exporters to re-trace with a dynamic batch.
    """

    def __init__(self, program: torch.export.ExportedProgram, source: str = "program") -> None:
        super().__init__()
        inputs = _user_input_shapes(program)
        if len(inputs) != 1 or len(inputs[0]) != 4:
            raise ModelLoadError(
                f"{source} takes {len(inputs)} tensor input(s) of shape(s) {[tuple(map(str, s)) for s in inputs]}; "
                "fundus-edge needs a model with one image input (N, C, H, W) or (N, H, W, C)")
        batch = inputs[0][0]
        self.static_batch: int | None = batch if isinstance(batch, int) else None
        self.program = program
        self._run = program.module()
        self.train(False)

    def train(self, mode: bool = True) -> ExportedProgramModule:
        self.training = mode  # the program's behaviour is fixed; its graph module raises on .train()/.eval()
        return self

    def forward(self, x: torch.Tensor) -> Any:
        b = self.static_batch
        if b is None or x.shape[0] == b:
            return self._run(x)
        n = x.shape[0]
        pad = (-n) % b
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        return torch.cat([self._run(piece) for piece in x.split(b)])[:n]

    def exportable(self) -> nn.Module:
        """The program's graph without its input guards, re-traceable with a dynamic batch by either exporter."""
        return _UnguardedProgram(self.program.module(check_guards=False))


class _UnguardedProgram(nn.Module):
    """A program's graph module, in a module whose ``train()``/``eval()`` (which the TorchScript exporter calls)
    do not reach the graph module, which raises on them."""

    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.training = False

    def train(self, mode: bool = True) -> _UnguardedProgram:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> Any:
        return self.graph_module(x)


def _user_input_shapes(program: torch.export.ExportedProgram) -> list[tuple[Any, ...]]:
    names = set(program.graph_signature.user_inputs)
    shapes = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            shape = getattr(val, "shape", ())
            shapes.append(tuple(int(d) if isinstance(d, int) else d for d in shape))
    return shapes


def _training_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Operators that behave as in training mode (BatchNorm on batch statistics, active Dropout)."""
    found = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        training_bn = name.startswith("aten.batch_norm") and len(node.args) > 5 and node.args[5] is True
        if training_bn or "_native_batch_norm_legit_functional" in name or name.endswith("legit.default"):
            found.add("BatchNorm")
        elif "dropout" in name and (node.args[-1] is True or node.kwargs.get("train") is True):
            found.add("Dropout")
    return sorted(found)


def load_exported_program(path: Path, arch: str | None = None, num_classes: int | None = None) -> LoadedModel:
    """Load a ``torch.export`` (.pt2) file; metadata saved as ``extra_files={"fundus_edge.json": ...}`` is read."""
    extra = {PT2_META_FILE: ""}
    try:
        ep = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a loadable torch.export (.pt2) file: {exc}") from exc
    meta: dict[str, Any] = {}
    if extra.get(PT2_META_FILE):
        try:
            meta = json.loads(extra[PT2_META_FILE])
        except ValueError as exc:
            raise ModelLoadError(f"{path}: its {PT2_META_FILE} is not JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{path}: its {PT2_META_FILE} must be a JSON object")
    training = _training_ops(ep)
    if training:
        raise ModelLoadError(
            f"{path} was exported in training mode ({', '.join(training)} in training behaviour): call "
            "model.eval() before torch.export.export(...) and save it again")
    num_classes = num_classes or meta.get("num_classes")
    return LoadedModel(ExportedProgramModule(ep, str(path)), source=str(path), arch=arch or meta.get("arch"),
                       num_classes=int(num_classes) if num_classes else None, meta=meta, program=ep)


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
        return load_exported_program(path, arch, num_classes)
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
