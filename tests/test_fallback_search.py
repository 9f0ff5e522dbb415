"""The accuracy-aware search itself (ranking, doubling, bisection, greedy steps, the int8 floor) on a synthetic
target whose 'quantization error' per node is known, so the expected answer is known too. The real
toolchains run the same loop in test_fallback_fragile.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.gate.gate import GateCriteria
from fundus_edge.quantization import search as fallback
from fundus_edge.quantization.fallback import (
    FallbackBudget,
    FallbackResult,
    GateSpec,
    decision_weights,
    search_fallback,
)

N_IMAGES = 400
NODES = [f"n{i}" for i in range(10)]


@dataclass
class _Outcome:
    path: Path
    int8_mac_fraction: float


@dataclass
class _FakeTarget:
    """Each node adds its own error to the margins while it is quantized; each holds 10 % of the MACs."""

    reference: Path
    fmt: str = "fake"

    def candidates(self) -> list[tuple[str, str]]:
        return [(n, "Conv") for n in NODES]

    def describe(self, node: str) -> str:
        return f"features.{node[1:]}"

    def nodes(self, excluded: list[str]) -> list[str]:
        return list(excluded)

    def quantize(self, excluded: list[str], path: Path) -> _Outcome:
        path.write_text(json.dumps(sorted(excluded)))
        return _Outcome(path, 1.0 - 0.1 * len(set(excluded)))


def _fake_backend(strengths: dict[str, float], base: np.ndarray, reference: Path):
    rng = np.random.default_rng(0)
    noise = {n: rng.normal(0.0, 1.0, N_IMAGES) for n in NODES}

    def run(fmt: str, path: Path, inputs: np.ndarray, settings: object = None) -> tuple[np.ndarray, None]:
        idx = inputs[:, 0].astype(int)
        margin = base[idx].copy()
        if Path(path) != reference:
            excluded = set(json.loads(Path(path).read_text()))
            for n in NODES:
                if n not in excluded:
                    margin += strengths[n] * noise[n][idx]
        return np.stack([np.zeros_like(margin), margin], axis=1), None

    return run


def _setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, strengths: dict[str, float]) -> dict[str, object]:
    rng = np.random.default_rng(1)
    labels = (rng.random(N_IMAGES) < 0.4).astype(int)
    base = np.where(labels == 1, 2.0, -2.0) + rng.normal(0, 1.5, N_IMAGES)
    reference = tmp_path / "fp32.fake"
    reference.write_text("[]")
    monkeypatch.setattr(fallback, "run_backend", _fake_backend(strengths, base, reference))
    ref_scores = 1 / (1 + np.exp(-base))
    x = np.arange(N_IMAGES, dtype=np.float32)[:, None]
    return {"target": _FakeTarget(reference), "out": tmp_path / "int8.fake", "tuning_pool": x[:200],
            "gate": (x[200:], labels[200:], [1], ref_scores[200:], 0.5)}


def _search(args: dict[str, object], criteria: GateCriteria) -> FallbackResult:
    spec = GateSpec(*args["gate"], criteria=criteria)  # type: ignore[misc]
    return search_fallback(args["target"], args["out"], args["tuning_pool"], spec,  # type: ignore[arg-type]
                           FallbackBudget(tuning_images=200))


def test_search_keeps_the_sensitive_nodes_and_bisects_to_the_shortest_passing_set(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    strengths = {n: (0.8 if n in ("n3", "n7", "n5") else 0.002) for n in NODES}
    args = _setup(monkeypatch, tmp_path, strengths)
    res = _search(args, GateCriteria(n_boot=20))
    assert not res.steps[0].passed  # plain "int8" fails
    assert res.passed and sorted(res.excluded) == ["n3", "n5", "n7"]
    assert {r["node"] for r in res.ranking[:3]} == {"n3", "n5", "n7"}  # the ranking found the sensitive three
    # doubling 1, 2, 4 (pass) then bisection tries 3 (pass): 4 candidates after the plain one
    assert [len(s.excluded) for s in res.steps] == [0, 1, 2, 4, 3]
    assert res.quant.int8_mac_fraction == pytest.approx(0.7)
    d = res.to_dict()
    assert [k["where"] for k in d["kept_in_float_detail"]] == [f"features.{n[1:]}" for n in res.excluded]
    assert json.loads(Path(str(args["out"])).read_text()) == sorted(res.excluded)  # the chosen file is the one written


def test_candidates_are_selected_on_the_search_part_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Plain int8 is gated on every image; the search's candidates only on the search part of a stratified split,
    so that the disjoint certification part can certify the pick without selection bias (docs/gate.md)."""
    from fundus_edge.gate.evidence import stratified_split

    strengths = {n: (0.8 if n in ("n3", "n7", "n5") else 0.002) for n in NODES}
    args = _setup(monkeypatch, tmp_path, strengths)
    gate_args: tuple[Any, ...] = args["gate"]  # type: ignore[assignment]
    labels: np.ndarray = gate_args[1]
    search, certify = stratified_split(labels, seed=0)
    spec = GateSpec(*gate_args, criteria=GateCriteria(n_boot=20), search=search)  # type: ignore[misc]
    res = search_fallback(args["target"], args["out"], args["tuning_pool"], spec,  # type: ignore[arg-type]
                          FallbackBudget(tuning_images=200))
    assert res.steps[0].n_images == len(labels) and not res.steps[0].passed
    assert all(s.n_images == len(search) for s in res.steps[1:]) and len(res.steps) > 1
    assert res.gate.certification == {"images": "search part", "n": len(search)}
    assert len(search) + len(certify) == len(labels) and not set(search) & set(certify)


def test_a_passing_but_mostly_float_candidate_fails_the_int8_floor(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    strengths = {n: 0.6 for n in NODES}  # every node matters: only (almost) all-float passes
    args = _setup(monkeypatch, tmp_path, strengths)
    res = _search(args, GateCriteria(n_boot=20))
    assert not res.passed
    assert all(s.int8_mac_fraction >= 0.5 or any("mostly fp32" in f for f in s.failures) for s in res.steps)
    assert any("mostly fp32" in f for s in res.steps for f in s.failures)
    # with the floor off, the same search accepts a mostly-float candidate, and it is flagged as such
    res0 = _search(args, GateCriteria(n_boot=20, min_int8_mac_fraction=0.0))
    assert res0.passed and res0.mostly_float and res0.to_dict()["mostly_float"]


def test_decision_weights_favour_images_near_the_operating_point() -> None:
    w = decision_weights(np.array([-10.0, -2.2, 0.0, 12.0]), threshold=0.1)  # threshold margin log(1/9) = -2.197
    assert w.sum() == pytest.approx(1.0)
    assert w.argmax() == 1 and w[1] > 20 * w[3] and w[1] > w[2] > w[0]
