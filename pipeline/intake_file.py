"""What the brought-file model stages (``.onnx``, ``.tflite``) share: the request checks, the preprocessing (from
the file's input and the command line's flags; a file carries no checkpoint metadata), and the reference stage:
the brought fp32 file copied into the bundle byte for byte, its copy run through the runtime backend against the
original (parity reported like an exporter's). Torch is never imported here."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError, MissingDependencyError, ModelLoadError, OutputContractError, UsageError
from ..runtime.backends import BackendSettings, run_backend
from ..runtime.compare import Tolerance, compare_outputs
from ..runtime.preprocess import PreprocessSpec
from .artifacts import BuiltArtifact
from .config import BuildConfig
from .formats import FormatSpec
from .progress import Progress
from .stages import Exported, ModelInfo

DEFAULT_SIZE = 224  # the input side of a file with a dynamic height and width when --input-size is not given
NAMES = {"onnx": "an ONNX", "tflite": "a TFLite"}


def check_file_request(cfg: BuildConfig, kind: str, needs: tuple[tuple[str, str, str], ...]) -> None:
    """A brought ``kind`` file builds ``kind`` artifacts of a classifier; ``needs``: (module, package, extra)."""
    path = Path(cfg.model)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    if tuple(cfg.formats) != (kind,):
        raise UsageError(f"{NAMES[kind]} model file builds {kind} artifacts only (--formats {kind}); got --formats "
                         f"{','.join(cfg.formats)}. Converting between formats needs the model's framework: build "
                         "from the PyTorch model, or convert the file yourself and build each one")
    if cfg.task == "segmentation":
        raise UsageError(f"building a segmentation model from {NAMES[kind]} file is not supported yet: build it "
                         "from the PyTorch model (--task segmentation)")
    if cfg.arch:
        raise UsageError(f"--arch names the architecture of a PyTorch state_dict; {path.name} carries its own graph")
    for module, package, extra in needs:
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(package, extra, f"Building from {NAMES[kind]} model file")


def file_preprocessing(cfg: BuildConfig, layout: str, size: int | None, name: str) -> PreprocessSpec:
    """The preprocessing of a brought file: ``cfg.preprocessing`` (library callers) or the defaults, the
    command line's flags on top, then the file's own input layout and (when fixed) size."""
    over = dict(cfg.preprocess_overrides)
    if "layout" in over and over["layout"] != layout:
        raise UsageError(f"{name} takes {layout} input; --layout {over['layout']} does not match it")
    want = over.get("size")
    if size is not None and want is not None and want != size:
        raise UsageError(f"--input-size {want}, but {name} takes {size} x {size} images")
    base = cfg.preprocessing or PreprocessSpec()
    if cfg.preprocessing is not None and size is not None and "size" not in over and base.size != size:
        raise UsageError(f"the preprocessing says size {base.size}, but {name} takes {size} x {size} images")
    over.update(layout=layout, size=size or want or (base.size if cfg.preprocessing else DEFAULT_SIZE))
    return replace(base, **over)


def classifier_only(exc: OutputContractError, name: str) -> OutputContractError:
    """The contract error of a brought file, saying that a file builds as a classifier only."""
    return OutputContractError(f"{exc} (from a model file such as {name} the kit builds classifiers only; a "
                               "segmentation model builds from its PyTorch model)", exc.shape, exc.task)


def source_parity(fmt: FormatSpec, source: Path, copy: Path, x: np.ndarray, model: ModelInfo, cfg: BuildConfig,
                  name: str) -> dict[str, Any]:
    """The shipped copy against the brought file, through the runtime backend, on the parity images."""
    settings = BackendSettings(threads=cfg.threads)
    ref, _ = run_backend(fmt.name, source, x, settings)
    got, _ = run_backend(fmt.name, copy, x, settings)
    result = compare_outputs(ref, got, reference_name="source file", candidate_name=name,
                             tolerance=Tolerance(atol=cfg.export_atol), positive_classes=model.positive)
    if not result:
        raise ExportError(f"{name} disagrees with the brought file {source.name}: {'; '.join(result.failures)}")
    return result.to_dict()


def reference_copy_stage(fmt: FormatSpec, cfg: BuildConfig, model: ModelInfo, parity_x: np.ndarray, staging: Path,
                         progress: Progress, compute: dict[str, Any] | None = None) -> Exported:
    """The fp32 artifact IS the brought file: copied byte for byte (sha256 checked), its parity reported."""
    from ..bundle.read import sha256_file

    facts = model.source_file or {}
    source = Path(model.source)
    progress.stage(f"taking {source.name} as the fp32 reference (copied unchanged, parity of the copy checked)")
    path = staging / fmt.file_name("fp32")
    shutil.copyfile(source, path)
    if sha256_file(path) != facts.get("sha256"):
        raise ExportError(f"{source.name} changed while the build read it (sha256 differs); build again")
    art = BuiltArtifact(fmt.artifact_id("fp32"), path.name, fmt.name, "fp32", model.spec.layout, "float32")
    parity = source_parity(fmt, source, path, parity_x, model, cfg, art.id)
    progress.say(f"{art.id}: {source.name} (sha256 {str(facts.get('sha256'))[:12]}...), parity of the copy: "
                 f"max|d| {parity['max_abs']:.1e} on {parity['n']} images ({progress.seconds()})")
    info = {**parity, "exporter": f"none: the brought {fmt.name} file, copied unchanged", "source": facts}
    return Exported(fmt, art, info, compute)
