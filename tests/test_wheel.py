"""The wheel `make wheel` builds carries what its commands read (device profiles, install templates, the deploy/
config and systemd unit, the manifest schema when present) and not the torch training weights."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from device_venv import REPO, build_wheel

# Measured: 11,089,690 bytes with models/weights/*.pt inside; 274,490 bytes without (this change). The bound
# leaves room for code and data files to grow, and fails loudly if the 12 MB of weights come back.
MAX_WHEEL_BYTES = 1_000_000


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_what_the_commands_read(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for profile in (REPO / "devices" / "profiles").glob("*.toml"):
        assert f"fundus_edge/devices/profiles/{profile.name}" in names
    for template in (REPO / "devices" / "templates").iterdir():
        assert f"fundus_edge/devices/templates/{template.name}" in names
    assert "fundus_edge/deploy/systemd/fundus-edge-watch.service" in names
    assert "fundus_edge/deploy/device.toml" in names
    assert "fundus_edge/py.typed" in names
    for schema in (REPO / "bundle").glob("*.schema.json"):  # bundle/manifest.schema.json, once it is added
        assert f"fundus_edge/bundle/{schema.name}" in names
    # every module of the packages the console script imports
    for pkg in ("runtime", "runtime/backends", "runtime/field", "devices", "bundle", "gate", "cli"):
        for py in (REPO / pkg).glob("*.py"):
            assert f"fundus_edge/{pkg}/{py.name}" in names


def test_wheel_leaves_out_weights_and_sample_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".pt", ".pth", ".onnx", ".tflite", ".jpg"))]
    assert not [n for n in names if "/tests/" in n or "models/weights" in n]
    size = wheel.stat().st_size
    assert size < MAX_WHEEL_BYTES, f"the wheel is {size} bytes"


def test_missing_sample_photos_say_where_they_come_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fundus_edge.datasets import open_fundus
    from fundus_edge.errors import DataError

    assert len(open_fundus.sample_photos()) >= 5  # a checkout has them
    monkeypatch.setattr(open_fundus, "SAMPLES", tmp_path / "absent")  # as in a wheel install
    with pytest.raises(DataError, match="source checkout or the sdist"):
        open_fundus.sample_photos()
