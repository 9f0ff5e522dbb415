"""The typed manifest (bundle/manifest.py): v1 bundles load, v2 round-trips exactly, malformed manifests are refused
with exit code 4 and a message naming the field, and the committed JSON Schema matches the classes."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fundus_edge.bundle.manifest import SCHEMA_FILE, Manifest, json_schema, json_schema_text, migrate_v1
from fundus_edge.bundle.read import MANIFEST, load_bundle
from fundus_edge.bundle.write import write_manifest
from fundus_edge.cli import main
from fundus_edge.errors import BundleError

V1 = Path(__file__).parent / "data" / "bundles" / "v1"


def v1_raw() -> dict[str, Any]:
    return json.loads((V1 / MANIFEST).read_text())


def test_v1_fixture_loads_as_v2() -> None:
    b = load_bundle(V1)  # verifies every listed file's checksum too
    raw = v1_raw()
    assert raw["schema_version"] == 1 and "task" not in raw
    m = b.spec
    assert m.schema_version == 2 and m.task == "classification"
    assert b.class_names == raw["model"]["class_names"] and b.positive_classes == raw["model"]["positive_classes"]
    assert m.output.meaning.kind == raw["output"]["kind"] == "logits"
    assert m.output.meaning.activation == "softmax"
    assert b.operating_point.threshold == raw["operating_point"]["threshold"]
    assert [a.id for a in b.artifacts] == [a["id"] for a in raw["artifacts"]]
    assert b.artifact().id == raw["default_artifact"]
    assert b.preprocessing.to_dict() == raw["preprocessing"]
    assert b.input_name == raw["input"]["name"]
    assert m.device is not None and m.device.profile == raw["device"]["profile"]
    assert m.producer.fundus_edge == raw["producer"]["fundus_edge"]
    # nothing but the moved fields changes in the migration
    moved = b.manifest
    for key in raw:
        if key not in ("model", "output", "schema_version"):
            assert moved[key] == raw[key], key


def test_round_trip_is_exact() -> None:
    v2 = migrate_v1(v1_raw())
    m = Manifest.from_dict(v2)
    assert m.to_dict() == v2
    assert Manifest.from_dict(json.loads(m.to_json())) == m


def test_write_manifest_typed_and_plain(tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(V1, b)
    typed = load_bundle(b).spec
    write_manifest(b, typed)  # checksums recomputed: the same files give the same manifest
    assert json.loads((b / MANIFEST).read_text()) == typed.to_dict()
    # the plain dict build writes today (v1 layout, files a list, no schema keys) is written as v2
    plain = {k: v for k, v in v1_raw().items() if k not in ("schema", "schema_version")}
    plain["files"] = list(plain["files"])
    write_manifest(b, plain)
    again = load_bundle(b).spec
    assert again == typed and json.loads((b / MANIFEST).read_text())["schema_version"] == 2
    plain["operating_point"] = {**plain["operating_point"], "threshold": "0.5"}
    with pytest.raises(BundleError, match=r"operating_point\.threshold"):
        write_manifest(b, plain)


def test_committed_json_schema_is_generated() -> None:
    assert SCHEMA_FILE.read_text() == json_schema_text(), \
        "bundle/manifest.schema.json is stale: regenerate it with python -m fundus_edge.bundle.manifest"


def test_json_schema_accepts_the_v1_fixture_after_migration() -> None:
    import jsonschema  # a dev dependency: missing, the test fails rather than skips
    jsonschema.Draft202012Validator.check_schema(json_schema())
    jsonschema.validate(migrate_v1(v1_raw()), json_schema(), cls=jsonschema.Draft202012Validator)
    with pytest.raises(jsonschema.ValidationError):  # the schema describes v2 only
        jsonschema.validate(v1_raw(), json_schema(), cls=jsonschema.Draft202012Validator)


def test_json_schema_accepts_the_built_bundle(built: Any) -> None:
    import jsonschema  # a dev dependency: missing, the test fails rather than skips
    raw = json.loads((built.out / MANIFEST).read_text())
    assert raw["schema_version"] == 2 and raw["task"] == "classification"
    jsonschema.validate(raw, json_schema(), cls=jsonschema.Draft202012Validator)
    assert Manifest.from_dict(raw).to_dict() == raw


# ------------------------------------------------------------------------------------------------ malformed
Edit = Callable[[dict[str, Any]], Any]


def _set(path: str, value: Any) -> Edit:
    """``path``: keys joined by '/' (list indices as numbers)."""
    def edit(m: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        d: Any = m
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if value is _DELETE:
            del d[last]
        else:
            d[int(last) if isinstance(d, list) else last] = value
    return edit


_DELETE = object()
_ART = "artifacts/0"
MALFORMED: dict[str, tuple[Edit, str]] = {
    "artifact-string": (_set("artifacts", ["model.fp32.onnx"]), "artifacts[0]"),
    "file-without-sha256": (_set("files/report.md/sha256", _DELETE), "files.report.md.sha256"),
    "file-bytes-string": (_set("files/report.md/bytes", "77"), "files.report.md.bytes"),
    "positive-out-of-range": (_set("output/meaning/positive_classes", [2]), "output.meaning.positive_classes"),
    "positive-empty": (_set("output/meaning/positive_classes", []), "output.meaning.positive_classes"),
    "positive-strings": (_set("output/meaning/positive_classes", ["1"]), "output.meaning.positive_classes[0]"),
    "positive-negative": (_set("output/meaning/positive_classes", [-1]), "output.meaning.positive_classes[0]"),
    "size-float": (_set("preprocessing/size", 224.0), "preprocessing.size"),
    "size-string": (_set("preprocessing/size", "224"), "preprocessing.size"),
    "input-shape-float": (_set("input/shape", ["batch", 3, 224.0, 224]), "input.shape[2]"),
    "mean-nan": (_set("preprocessing/mean", [float("nan"), 0.456, 0.406]), "preprocessing.mean[0]"),
    "std-inf": (_set("preprocessing/std", [0.229, float("inf"), 0.225]), "preprocessing.std[1]"),
    "std-zero": (_set("preprocessing/std", [0.229, 0.0, 0.225]), "preprocessing"),
    "std-negative": (_set("preprocessing/std", [0.229, -0.2, 0.225]), "preprocessing"),
    "std-two-values": (_set("preprocessing/std", [0.229, 0.224]), "preprocessing.std"),
    "unknown-default-artifact": (_set("default_artifact", "onnx-fp16"), "default_artifact"),
    "unknown-schema": (_set("schema", "fundus-edge/other"), "schema"),
    "unknown-schema-version": (_set("schema_version", 3), "schema version 3"),
    "schema-version-string": (_set("schema_version", "2"), "schema version '2'"),
    "unknown-task": (_set("task", "detection"), "task"),
    "missing-operating-point": (_set("operating_point", _DELETE), "operating_point"),
    "missing-producer-python": (_set("producer/python", _DELETE), "producer.python"),
    "missing-artifact-format": (_set(f"{_ART}/format", _DELETE), "artifacts[0].format"),
    "threshold-out-of-range": (_set("operating_point/threshold", 1.5), "operating_point.threshold"),
    "threshold-bool": (_set("operating_point/threshold", True), "operating_point.threshold"),
    "artifact-not-in-files": (_set(f"{_ART}/path", "elsewhere.onnx"), "artifacts[0].path"),
    "artifact-sha-mismatch": (_set(f"{_ART}/sha256", "0" * 64), "artifacts[0].sha256"),
    "duplicate-artifact-id": (lambda m: m["artifacts"].append(copy.deepcopy(m["artifacts"][0])), "artifacts[2].id"),
    "unknown-field": (_set("extra", 1), "extra"),
    "gate-summary-stranger": (_set("gate/summary/tflite-int8", {"passed": True, "delta_auc": 0.0,
                                                                "delta_sensitivity": 0.0, "flips": 0}),
                              "gate.summary.tflite-int8"),
    "file-outside-bundle": (lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "bytes": 1}}), "files.../x"),
    "class-count-mismatch": (_set("model/num_outputs", 5), "model.num_outputs"),
}


def _write_case(tmp_path: Path, text: str) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(V1, b)
    (b / MANIFEST).write_text(text)
    return b


def _assert_refused(b: Path, capsys: pytest.CaptureFixture[str], names: str) -> None:
    code = main(["info", "--bundle", str(b)])
    err = capsys.readouterr().err
    assert code == 4, err
    assert err.startswith("fundus-edge: error: ") and "Traceback" not in err
    assert names in err, err


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_refused(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit, names = MALFORMED[case]
    m = migrate_v1(v1_raw())
    edit(m)
    _assert_refused(_write_case(tmp_path, json.dumps(m, indent=2)), capsys, names)


def test_v1_manifest_without_class_names_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = v1_raw()
    del raw["model"]["class_names"]
    _assert_refused(_write_case(tmp_path, json.dumps(raw)), capsys, "model.class_names")


def _deep(depth: int) -> str:
    text = json.dumps(migrate_v1(v1_raw()))
    return text.replace('"training": {', '"training": {"deep": ' + "[" * depth + "]" * depth + ", ", 1)


TEXT_CASES = {
    "duplicate-key": (lambda: json.dumps(migrate_v1(v1_raw())).replace('"name": ', '"name": "x", "name": ', 1),
                      "'name' twice"),
    "deep-nesting": (lambda: _deep(100_000), "nested too deeply"),
    "not-an-object": (lambda: "[]", "not a JSON object"),
    "not-json": (lambda: "{", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_malformed_manifest_text_is_refused(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, names = TEXT_CASES[case]
    _assert_refused(_write_case(tmp_path, make()), capsys, names)


def test_refusal_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    """The CLI as a process: exit code 4 and one line of error, for the manifests that crash naive readers."""
    for case in ("duplicate-key", "deep-nesting"):
        b = _write_case(tmp_path / case, TEXT_CASES[case][0]())
        p = subprocess.run([sys.executable, "-m", "fundus_edge", "info", "--bundle", str(b)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 4, p.stderr
        assert "Traceback" not in p.stderr and p.stderr.startswith("fundus-edge: error: ")


def test_typed_construction_as_build_does(tmp_path: Path) -> None:
    """The constructors build uses (see the report to the lead): every part typed, files checksummed on write."""
    from fundus_edge.bundle.manifest import (
        SCHEMA,
        SCHEMA_VERSION,
        Artifact,
        ClassificationMeaning,
        Compute,
        Device,
        GateEntry,
        GateSummary,
        ModelInfo,
        OperatingPoint,
        OutputSpec,
        Producer,
        TensorSpec,
    )
    from fundus_edge.runtime.preprocess import PreprocessSpec

    b = tmp_path / "b"
    b.mkdir()
    (b / "model.fp32.onnx").write_bytes(b"fp32")
    (b / "report.md").write_text("report")
    raw = v1_raw()
    spec = PreprocessSpec()
    m = Manifest(
        schema=SCHEMA, schema_version=SCHEMA_VERSION, task="classification", bundle_id="dr-0123456789ab", name="dr",
        created="2026-12-03T15:27:36+00:00",
        model=ModelInfo(source="reference:dr-resnet18s", arch="fundus-edge:resnet18s", num_outputs=2,
                        referable_rule="grade >= 2", training=None),
        input=TensorSpec(name="input", shape=("batch", 3, spec.size, spec.size), dtype="float32", layout=spec.layout),
        output=OutputSpec(name="logits", shape=("batch", 2), dtype="float32",
                          meaning=ClassificationMeaning(kind="logits", activation="softmax",
                                                        class_names=("no-referable", "referable"),
                                                        positive_classes=(1,))),
        preprocessing=spec,
        operating_point=OperatingPoint(threshold=0.52, rule="sensitivity>=0.90", locked_on="onnx-fp32",
                                       sensitivity=0.9, specificity=0.8),
        artifacts=(Artifact(id="onnx-fp32", path="model.fp32.onnx", format="onnx", precision="fp32", layout="NCHW",
                            io_dtype="float32", gate={"passed": True, "role": "reference"}),),
        default_artifact="onnx-fp32",
        gate=GateSummary(passed=True, allow_failed_gate=False, criteria=raw["gate"]["criteria"], n_validation=120,
                         summary={}),
        quantization={}, export={"onnx-fp32": raw["export"]["onnx-fp32"]},
        compute=Compute(**raw["compute"]),
        producer=Producer.from_dict(raw["producer"]),
        device=Device(**{**raw["device"], "artifact": "onnx-fp32"}),
        files={},
    )
    write_manifest(b, m, files=["model.fp32.onnx", "report.md"])
    loaded = load_bundle(b)
    assert loaded.spec.files["report.md"].bytes == 6 and loaded.artifact().id == "onnx-fp32"
    assert loaded.spec == Manifest.from_dict(m.with_files(loaded.spec.files).to_dict())
    assert GateEntry.from_dict({"passed": True, "delta_auc": 0.0, "delta_sensitivity": None, "flips": 0}).flips == 0
    with pytest.raises(BundleError, match=r"operating_point\.threshold"):
        write_manifest(b, replace(m, operating_point=OperatingPoint(threshold=2.0, rule="x")), files=["report.md"])
