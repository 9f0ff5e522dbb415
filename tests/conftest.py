"""Shared fixtures: small synthetic data sets and one bundle built by the real toolchain (session-scoped)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fundus_edge.datasets.synthetic import write_dataset

DATA = Path(__file__).parent / "data"
REAL_PHOTOS = sorted((DATA / "fundus").glob("*.jpg"))


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own state directory (device key, integrity anchors): nothing is written to $HOME."""
    monkeypatch.setenv("FUNDUS_EDGE_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(scope="session")
def real_photos() -> list[Path]:
    assert len(REAL_PHOTOS) >= 5, "tests/data/fundus should hold the CC0 photographs"
    return REAL_PHOTOS


@pytest.fixture(scope="session")
def synth_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 labelled synthetic images (EyePACS layout), three camera profiles: the demo's validation set."""
    return write_dataset(tmp_path_factory.mktemp("val"), 300, seed=12, cameras=("desktop", "handheld", "darkred"))


@pytest.fixture(scope="session")
def synth_calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cameras = ("desktop", "handheld", "darkred")
    return write_dataset(tmp_path_factory.mktemp("calib"), 64, seed=11, cameras=cameras).parent


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, synth_val: Path, synth_calib: Path,
          real_photos: list[Path]) -> Iterator[object]:
    """The reference model built into a bundle exactly as `make demo` does."""
    from fundus_edge.pipeline.build import BuildConfig, run_build

    out = tmp_path_factory.mktemp("bundles") / "dr"
    result = run_build(BuildConfig(model="reference:dr-resnet18s", out=out, calib=synth_calib, val=synth_val,
                                   name="dr-test", parity_images=real_photos, allow_insufficient_evidence=True),
                       log=lambda s: None)
    yield result


@pytest.fixture()
def bundle_copy(built: object, tmp_path: Path) -> Path:
    """A private copy of the built bundle that a test may damage."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(built.out, dst)  # type: ignore[attr-defined]
    return dst
