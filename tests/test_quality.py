"""The image-quality gate: measures, defaults on synthetic degradations, calibration, screening, the gate."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fundus_edge.bundle.read import MANIFEST, write_manifest
from fundus_edge.cli import main
from fundus_edge.datasets.degrade import DEGRADATIONS, NON_FUNDUS, degrade, non_fundus, quality_set
from fundus_edge.datasets.synthetic import CameraProfile, generate
from fundus_edge.errors import BundleError, UsageError
from fundus_edge.gate.metrics import auc
from fundus_edge.runtime import load, load_bundle
from fundus_edge.runtime.quality import (
    DEFAULT_BOUNDS,
    HINTS,
    MEASURES,
    Bounds,
    QualityResult,
    QualitySpec,
    assess_source,
    judge,
)

SPEC = QualitySpec()
CAMERAS = ("desktop", "handheld", "darkred")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def judged() -> list[tuple[str, str, str | None, QualityResult]]:
    """A synthetic quality set (seed 5: not one of the seeds the defaults were tuned on), through JPEG."""
    out = []
    for s in quality_set(n_good=60, n_bad_each=6, n_non_fundus_each=6, seed=5, cameras=CAMERAS):
        result, _ = assess_source(_jpeg(s.image), SPEC)
        out.append((s.label, s.kind, s.camera, result))
    return out


def test_defaults_on_synthetic_degradations(judged: list[tuple[str, str, str | None, QualityResult]]) -> None:
    good = [r for label, _, _, r in judged if label == "good"]
    bad = [r for label, _, _, r in judged if label == "bad"]
    other = [r for label, _, _, r in judged if label == "non-fundus"]
    assert {k for label, k, _, _ in judged if label == "bad"} == set(DEGRADATIONS)
    assert {k for label, k, _, _ in judged if label == "non-fundus"} == set(NON_FUNDUS)
    assert np.mean([bool(r) for r in good]) >= 0.95
    assert np.mean([not r for r in other]) >= 0.95
    assert np.mean([not r for r in bad]) >= 0.90
    y = np.r_[np.ones(len(good)), np.zeros(len(bad))]
    assert auc(y, np.array([r.score for r in good + bad])) >= 0.97
    for cam in CAMERAS:  # the combined score holds on every camera colour profile
        g = [r.score for label, _, c, r in judged if label == "good" and c == cam]
        b = [r.score for label, _, c, r in judged if label == "bad" and c == cam]
        assert len(g) >= 15 and len(b) >= 15
        assert auc(np.r_[np.ones(len(g)), np.zeros(len(b))], np.array(g + b)) >= 0.97, cam


def test_score_and_failures_agree(judged: list[tuple[str, str, str | None, QualityResult]]) -> None:
    for _, kind, _, r in judged:
        assert (r.score >= 0.5) == bool(r) == (not r.failed), (kind, r.failed, r.score)
        assert len(r.reasons) == len(r.failed)
        assert (r.hint is None) == bool(r)
        assert set(r.measures) == set(MEASURES)
    # failures name the right kind of problem
    blur = Counter(f for _, kind, _, r in judged if kind == "blur" for f in r.failed)
    shake = Counter(f for _, kind, _, r in judged if kind == "motion-blur" for f in r.failed)
    assert blur["sharpness"] >= 5  # of 6: defocus is told by sharpness ...
    assert shake["isotropy"] >= 5  # ... camera shake by the fine detail running one way
    assert all("brightness" in r.failed for _, kind, _, r in judged if kind in ("underexposed", "dark-noisy"))
    assert all("noise" in r.failed for _, kind, _, r in judged if kind == "noise")


def test_real_photographs_pass(real_photos: list[Path]) -> None:
    for p in real_photos:
        r, pre = assess_source(p, SPEC)
        assert r, (p.name, r.reasons)
        assert pre.quality_image is pre.image  # default sizes match: the network crop is reused, no extra resize


def test_darkness_is_guarded_first(real_photos: list[Path]) -> None:
    """A very dark, amplified photo can look vessel-rich; it must fail on brightness, with the light hint."""
    img = Image.open(real_photos[0]).convert("RGB")
    rng = np.random.default_rng(0)
    dark = DEGRADATIONS["dark-noisy"](img, rng)
    r, _ = assess_source(_jpeg(dark), SPEC)
    assert not r and r.failed[0] == "brightness"
    assert r.hint == HINTS["dark"]
    # even when measures of other groups fail too, darkness is named first
    m = {**r.measures, "fov_border": 0.9, "sharpness": 0.01, "noise": 9.0}
    j = judge(m, SPEC)
    assert j.failed[0] == "brightness" and {"fov_border", "sharpness", "noise"} <= set(j.failed)
    assert j.hint == HINTS["dark"]


def test_degenerate_pictures_are_refused_without_warnings() -> None:
    """Black, white, a dot, a sliver: no field of view to speak of. Refused, and no numpy warning (-W error)."""
    frames = {"black": np.zeros((200, 300, 3), np.uint8), "white": np.full((200, 300, 3), 255, np.uint8),
              "dot": np.pad(np.full((6, 6, 3), 200, np.uint8), ((97, 97), (147, 147), (0, 0))),
              "sliver": np.pad(np.full((200, 12, 3), 180, np.uint8), ((0, 0), (0, 288), (0, 0)))}
    for name, arr in frames.items():
        r, _ = assess_source(Image.fromarray(arr), SPEC)
        assert not r and r.score < 0.5 and r.hint, name


def test_quality_on_other_sizes_and_network_crops(real_photos: list[Path]) -> None:
    from fundus_edge.runtime.preprocess import PreprocessSpec

    spec_320 = QualitySpec(size=320)
    r, pre = assess_source(real_photos[1], spec_320, PreprocessSpec(size=128))
    assert pre.quality_image is not None and pre.quality_image.size == (320, 320) and pre.image.size == (128, 128)
    assert r.measures["fov_found"] == 1.0 and 0.0 < r.measures["sharpness"] < 1.0


def test_spec_round_trip_partial_and_errors(tmp_path: Path) -> None:
    d = SPEC.to_dict()
    assert QualitySpec.from_dict(json.loads(json.dumps(d))) == SPEC
    partial = QualitySpec.from_dict({"measures": {"sharpness": {"min": 0.3}, "noise": {"max": None}}})
    assert partial.bounds["sharpness"] == Bounds(min=0.3, scale=DEFAULT_BOUNDS["sharpness"].scale)
    assert partial.bounds["noise"].max is None  # disabled
    assert partial.bounds["contrast"] == DEFAULT_BOUNDS["contrast"]
    for bad in ({"measures": {"focus": {"min": 1}}}, {"colour": 1}, {"version": 99},
                {"measures": {"brightness": {"min": 0.9, "max": 0.1}}}, {"measures": {"noise": {"max": "x"}}},
                {"size": 8}, {"size": "224"}, {"enabled": "false"}, {"measures": {"noise": {"max": float("nan")}}},
                {"measures": {"noise": {"scale": float("inf")}}}):
        with pytest.raises(UsageError):
            QualitySpec.from_dict(bad)
    assert Bounds(min=1.0, max=3.0, scale=0.5).margin(2.0) == pytest.approx(2.0)
    assert Bounds(min=1.0, scale=0.5).margin(0.5) == pytest.approx(-1.0)
    assert judge({k: 0.0 for k in MEASURES}, QualitySpec(bounds={})).score > 0.99  # no bounds: nothing fails


def test_calibrate_fits_a_new_camera(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Colour does not transfer: a greenish camera fails the defaults; calibration on its photos fixes that."""
    # red share ~0.38: below the defaults' floor (0.42, set for the darkest, brownest real fundi)
    cam = CameraProfile("greenish", (150, 135, 95), gain=(0.95, 1.05, 1.0), vignetting=0.55, noise=4.0, blur=0.8)
    dirs = {k: tmp_path / k for k in ("good", "bad", "good_test", "bad_test")}
    for d in dirs.values():
        d.mkdir()
    kinds = sorted(DEGRADATIONS)
    for i in range(24):
        generate(7000 + i, size=320, camera=cam).image.save(dirs["good"] / f"g{i}.jpg", quality=90)
        generate(8000 + i, size=320, camera=cam).image.save(dirs["good_test"] / f"g{i}.jpg", quality=90)
    for i, k in enumerate(kinds):
        degrade(generate(9000 + i, size=320, camera=cam).image, k, np.random.default_rng(i)).save(
            dirs["bad"] / f"{k}.jpg", quality=90)
        degrade(generate(9500 + i, size=320, camera=cam).image, k, np.random.default_rng(50 + i)).save(
            dirs["bad_test"] / f"{k}.jpg", quality=90)
    for i, k in enumerate(sorted(NON_FUNDUS)):
        non_fundus(k, 60 + i, size=400).save(dirs["bad"] / f"nf-{k}.jpg", quality=90)
    assert main(["quality", str(dirs["good_test"]), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)["summary"]
    assert before["gradable"] <= 0.5 * before["n"]  # the defaults do not fit this camera
    out = tmp_path / "spec.json"
    assert main(["quality", "calibrate", "--good", str(dirs["good"]), "--bad", str(dirs["bad"]), "--out", str(out),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_good"] == 24 and doc["n_bad"] == len(kinds) + len(NON_FUNDUS)
    assert {m["name"] for m in doc["measures"]} == set(MEASURES)
    assert all(m["auc"] is None or 0.0 <= m["auc"] <= 1.0 for m in doc["measures"])
    assert doc["calibrated"]["good_pass"] >= 0.95 and doc["calibrated"]["combined_auc"] >= 0.97
    assert any(m["name"] == "red_share" and m["action"] == "loosened" for m in doc["measures"])
    assert main(["quality", "--spec", str(out), str(dirs["good_test"]), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)["summary"]
    assert after["gradable"] >= 0.9 * after["n"]  # held-out good photos of the camera now pass
    assert main(["quality", "--spec", str(out), str(dirs["bad_test"]), "--json"]) == 0
    rejected = json.loads(capsys.readouterr().out)["summary"]
    assert rejected["ungradable"] >= 0.9 * rejected["n"]  # ... and held-out bad ones are still refused


def test_quality_cli_text_and_errors(real_photos: list[Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    blurred = tmp_path / "blurred.jpg"
    img = Image.open(real_photos[0]).convert("RGB")
    img.filter(ImageFilter.GaussianBlur(0.012 * min(img.size))).save(blurred, quality=92)
    assert main(["quality", str(real_photos[0]), str(blurred)]) == 0
    out = capsys.readouterr().out
    assert "GRADABLE" in out and "UNGRADABLE" in out and "sharpness" in out and "retake" in out
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    assert main(["quality", str(bad)]) == 10
    with pytest.raises(SystemExit) as e:
        main(["quality", "calibrate", "--good", str(tmp_path)])
    assert e.value.code == 2
    assert main(["quality", "--spec", str(tmp_path / "missing.json"), str(real_photos[0])]) == 2


# ------------------------------------------------------------------------------------ with the built bundle
def test_screen_blurred_and_overexposed_real_photo_is_ungradable(built: Any, real_photos: list[Path],
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    img = Image.open(real_photos[0]).convert("RGB")
    blurred = tmp_path / "blurred.jpg"
    img.filter(ImageFilter.GaussianBlur(0.012 * min(img.size))).save(blurred, quality=92)
    over = tmp_path / "overexposed.jpg"
    DEGRADATIONS["overexposed"](img, np.random.default_rng(1)).save(over, quality=92)
    with load(built.out) as s:
        ok, rb, ro = (s.screen(str(p)) for p in (real_photos[0], blurred, over))
    assert ok.decision in ("refer", "no-refer") and ok.quality and ok.quality["gradable"]
    assert "quality" in ok.timings_ms
    for r, expected in ((rb, {"sharpness"}), (ro, {"brightness", "saturated"})):
        assert r and r.decision == "ungradable" and r.probability is None  # no referral decision
        assert r.quality is not None and not r.quality["gradable"]
        assert expected & set(r.quality["failed"]), r.quality["failed"]
        assert "retake while the patient is here" in r.quality["hint"]
        d = r.to_dict()
        assert d["decision"] == "ungradable" and d["quality"]["reasons"] and "probability" not in d
    code = main(["screen", "--bundle", str(built.out), str(real_photos[0]), str(blurred), str(over), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["summary"]["ungradable"] == 2 and doc["summary"]["errors"] == 0
    assert main(["screen", "--bundle", str(built.out), str(blurred)]) == 0
    text = capsys.readouterr().out
    assert "UNGRADABLE" in text and "sharpness" in text and "1 ungradable" in text


def test_bundle_carries_the_spec_and_old_bundles_get_defaults(built: Any, bundle_copy: Path,
                                                               synth_val: Path) -> None:
    m = built.manifest
    assert m["quality"] == SPEC.to_dict()
    q = m["gate"]["quality"]
    assert q["ungradable_rate"] <= 0.02  # the synthetic validation photos are all of good quality
    artifacts = {a["id"] for a in m["artifacts"]}  # every shipped artifact, whatever its format
    assert {"onnx-fp32", "onnx-int8"} <= artifacts
    assert set(q["gradable"]) == artifacts and set(q["ungradable_as_refer"]) == artifacts
    rep = json.loads((built.out / "report.json").read_text())
    assert rep["quality"]["n"] == rep["reference"]["n"]
    assert "Image quality (gradable images)" in (built.out / "report.md").read_text()
    # an old bundle (no 'quality' in its manifest) loads with the default spec
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    del manifest["quality"]
    manifest["files"] = list(manifest["files"])
    write_manifest(bundle_copy, manifest)
    assert load_bundle(bundle_copy).quality == SPEC
    manifest["quality"] = {"measures": {"focus": {"min": 1.0}}}
    with pytest.raises(BundleError, match="quality"):  # build never writes a manifest the runtime refuses
        write_manifest(bundle_copy, manifest)
    (bundle_copy / MANIFEST).write_text(json.dumps({**load_bundle(bundle_copy).manifest,
                                                    "quality": manifest["quality"]}))
    with pytest.raises(BundleError, match="quality"):
        load_bundle(bundle_copy)
    # a spec that switches the gate off is honoured
    manifest["quality"] = {"enabled": False}
    write_manifest(bundle_copy, manifest)
    with load(bundle_copy) as s:
        r = s.screen(str(synth_val.parent / "synth_12_00000.jpg"))
    assert r.quality is None and r.decision in ("refer", "no-refer")


def test_check_reports_ungradable_rate_and_gradable_metrics(built: Any, synth_val: Path, tmp_path: Path) -> None:
    """A mixed validation set: the gate counts the ungradable images apart and evaluates the gradable ones."""
    from fundus_edge.cli.check_format import format_check
    from fundus_edge.pipeline.check import run_check

    with synth_val.open() as fh:
        rows = list(csv.reader(fh))[1:61]
    out_rows = []
    for i, (name, level) in enumerate(rows):
        src = synth_val.parent / name
        if i % 4 == 0:  # every fourth image blurred: 15 ungradable, both classes among them
            blurred = tmp_path / f"blurred_{name}"
            img = Image.open(src)
            img.filter(ImageFilter.GaussianBlur(0.015 * img.size[0])).save(blurred, quality=92)
            out_rows.append((str(blurred), level))
        else:
            out_rows.append((str(src), level))
    labels = tmp_path / "mixed.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label"))
        w.writerows(out_rows)
    result = run_check(built.out, labels)
    rep = result.to_dict()
    q = rep["quality"]
    assert q["n"] == 60 and q["n_ungradable"] == 15 and q["ungradable_rate"] == pytest.approx(0.25)
    assert q["failed_measures"]["sharpness"] == 15 and "note" in q  # > 20 % ungradable: the report says so
    y = np.array([int(level) >= 2 for _, level in out_rows])
    ungradable = np.array([i % 4 == 0 for i in range(60)])
    assert q["ungradable_referable"] == int((y & ungradable).sum())
    for art, e in q["gradable"].items():
        assert e["n"] == 45
        pol = q["ungradable_as_refer"][art]
        # referring every ungradable eye: each ungradable referable eye is a true positive, each other one a
        # false positive, on top of the gradable images' confusion at the same threshold
        c = e["confusion"]
        assert pol["confusion"]["tp"] == c["tp"] + q["ungradable_referable"]
        assert pol["confusion"]["fp"] == c["fp"] + q["ungradable_non_referable"]
        assert pol["confusion"]["tn"] == c["tn"] and pol["confusion"]["fn"] == c["fn"]
    text = format_check(result)
    assert "ungradable" in text and "gradable only" in text
    # the int8-vs-fp32 gate itself is unchanged: it still compares all images
    assert rep["evaluations"]["onnx-fp32"]["n"] == 60


def test_bench_measures_the_quality_share_side_by_side(built: Any, real_photos: list[Path], tmp_path: Path) -> None:
    """`bench` reports the quality stage and the end-to-end p50 with and without the check (gradable runs only)."""
    from fundus_edge.runtime.backends import BackendSettings
    from fundus_edge.runtime.bench import format_table, run_bench

    blurred = tmp_path / "blurred.jpg"
    img = Image.open(real_photos[0]).convert("RGB")
    img.filter(ImageFilter.GaussianBlur(0.012 * min(img.size))).save(blurred, quality=92)
    images = [str(real_photos[0]), str(real_photos[1]), str(blurred)]
    (row,) = run_bench(built.out, images, BackendSettings(threads=1), ["onnx-int8"], repeats=2, cold=False)
    q = row.quality_overhead
    assert q is not None and q["n_gradable_runs"] == 4 and q["n_ungradable_runs"] == 2
    assert q["e2e_p50_with_ms"] > 0 and q["e2e_p50_without_ms"] > 0 and q["quality_p50_ms"] > 0
    assert q["overhead"] == pytest.approx(q["e2e_p50_with_ms"] / q["e2e_p50_without_ms"] - 1)
    assert row.stages_ms["quality"].p50 > 0
    text = format_table([row])
    assert "image-quality check adds" in text and "ungradable" in text
