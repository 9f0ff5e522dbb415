"""Fuzzing the decoder and the screener with mutated real and synthetic images (hypothesis).

CI runs a few hundred cases; benchmarks/field_reliability.py runs the same property on 10,000+ and measures
memory. The property: whatever the bytes, preprocessing either succeeds or raises ImageError with a known code,
and Screener.screen never raises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from fundus_edge.datasets.badinputs import N_OPS, fuzz_seeds, mutate
from fundus_edge.errors import IMAGE_ERROR_CODES, ImageError
from fundus_edge.runtime import load
from fundus_edge.runtime.preprocess import PreprocessSpec, preprocess

REAL = sorted((Path(__file__).parent / "data" / "fundus").glob("*.jpg"))
# Real photographs only re-encoded small here (speed); the benchmark also mutates the originals.
SEEDS = [s for s in fuzz_seeds(REAL[:2], size=192) if not s[0].startswith("real:")]
SPEC = PreprocessSpec(size=224)

OPS = st.lists(st.tuples(st.integers(0, N_OPS - 1), st.integers(0, 2**31 - 1), st.integers(0, 2**16)),
               min_size=1, max_size=6)
FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_seeds_cover_formats_and_modes() -> None:
    names = {n for n, _ in SEEDS}
    assert {"jpeg", "jpeg-progressive", "jpeg-exif", "jpeg-cmyk", "png-palette", "png-16bit", "tiff", "webp",
            "gif"} <= names
    assert any(n.startswith("real-small:") for n in names)
    for name, data in SEEDS:  # every seed is valid before mutation...
        if name == "gif":  # ...except GIF, outside the decode allow-list (runtime/decode_limits.py): refused
            with pytest.raises(ImageError) as info:
                preprocess(data, SPEC)
            assert info.value.code == "not-an-image"
            continue
        assert preprocess(data, SPEC).tensor.shape == (1, 3, 224, 224)


@FUZZ
@given(st.integers(0, len(SEEDS) - 1), OPS)
def test_preprocess_raises_only_image_errors(which: int, ops: list[tuple[int, int, int]]) -> None:
    data = mutate(SEEDS[which][1], ops)
    try:
        pre = preprocess(data, SPEC)
    except ImageError as exc:
        assert exc.code in IMAGE_ERROR_CODES and exc.code != "internal-error"
        return
    assert pre.tensor.shape == (1, 3, 224, 224) and np.isfinite(pre.tensor).all()


@pytest.fixture(scope="module")
def screener(built: Any) -> Any:
    with load(built.out) as s:
        yield s


@seed(20251128)
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, len(SEEDS) - 1), ops=OPS)
def test_screener_never_raises(screener: Any, which: int, ops: list[tuple[int, int, int]]) -> None:
    r = screener.screen(mutate(SEEDS[which][1], ops))
    if r.error is None and r.decision == "ungradable":  # the quality gate: no referral decision, no inference
        assert r.quality is not None and not r.quality["gradable"] and r.probability is None
    elif r.error is None:
        assert r.decision in ("refer", "no-refer") and r.probability is not None
    else:
        assert r.error["code"] in IMAGE_ERROR_CODES and r.decision is None


def test_benchmark_fuzz_driver_counts_and_measures(tmp_path: Path) -> None:
    # the driver benchmarks/field_reliability.py runs with 10,000 cases
    from reliability import run_fuzz

    r = run_fuzz(120, SEEDS, seed=5, failures_dir=tmp_path)
    assert r["cases"] == 120 and r["uncaught"] == 0 and not r["unknown_codes"] and r["worker_starts"] == 1
    assert r["outcomes"].get("ok", 0) > 0 and r["outcomes"].get("decode-failed", 0) > 0
    assert r["rss_samples"] == 2 and r["rss_mib_median_last_1000"] > 10  # the worker's memory, every 100 cases


def test_fuzz_worker_crash_is_counted_not_fatal() -> None:
    from reliability import _Worker

    w = _Worker(None)
    try:
        assert w.run(SEEDS[0][1], 60)[0] == "ok"
        assert (w.run(SEEDS[0][1], 60, measure=True)[1] or 0) > 10 << 20
        w.proc.kill()  # stands in for a native crash inside a decoder
        w.proc.join()
        outcome, rss = w.run(SEEDS[0][1], 60)
        assert outcome.startswith("crashed") and rss is None and w.starts == 2
        assert w.run(b"", 60)[0] == "empty-file"  # the replacement worker goes on
    finally:
        w.close()
