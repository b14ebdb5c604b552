"""The whole-model calibration of a latency table (cstar.latency_fit) and the cost parts it prices."""

from __future__ import annotations

import numpy as np
import pytest

from cstar.latency_fit import CalibrationPoint, fit_price, spill_caches
from cstar.latency_table import CostParts, LatencyTable
from tests.cstar.test_latency import geometry, synthetic_table

PARTS = [CostParts(10.0, 30.0, 0), CostParts(4.0, 3.0, 30), CostParts(1.5, 0.0, 35), CostParts(0.8, 0.0, 40),
         CostParts(5.0, 10.0, 0), CostParts(2.0, 1.0, 20)]


def points(scale: float, rate: float, rest: float, node: float) -> list[CalibrationPoint]:
    return [CalibrationPoint(f"m{i}", p, rest + scale * p.alone_ms + rate * p.beyond_mib + node * p.extra_nodes)
            for i, p in enumerate(PARTS)]


def test_fit_recovers_the_in_model_price_exactly() -> None:
    fit = fit_price(points(1.2, 0.05, 0.04, 0.001), node_ms=0.001, rest_ms=0.04)
    assert fit.op_scale == pytest.approx(1.2, rel=1e-9)
    assert fit.weight_ms_per_mb == pytest.approx(0.05, rel=1e-9)
    assert fit.rest_ms == 0.04 and max(abs(e) for e in fit.errors().values()) < 1e-9


def test_fit_also_recovers_the_rest_when_it_was_not_measured() -> None:
    fit = fit_price(points(0.9, 0.1, 0.3, 0.0), node_ms=0.0, rest_ms=None)
    assert (fit.op_scale, fit.weight_ms_per_mb, fit.rest_ms) == pytest.approx((0.9, 0.1, 0.3), rel=1e-9)


def test_a_negative_streaming_rate_is_clamped_and_the_scale_refitted() -> None:
    """Models that get FASTER per MiB of big weights would need a negative rate: the fit keeps rate 0 and the
    best positive scale (the relative least squares of the scale alone)."""
    data = points(1.1, -0.05, 0.0, 0.0)
    fit = fit_price(data, node_ms=0.0, rest_ms=0.0)
    assert fit.weight_ms_per_mb == 0.0 and fit.op_scale > 0
    ratios = [p.measured_ms / p.parts.alone_ms for p in data]
    assert min(ratios) <= fit.op_scale <= max(ratios)


def test_relative_errors_weigh_a_small_model_like_a_big_one() -> None:
    """Two models, one 100x the other, each with its own in-model factor: the fitted scale lies between the
    two factors, near their middle, not at the big model's."""
    data = [CalibrationPoint("big", CostParts(100.0, 0.0, 0), 110.0), CalibrationPoint("small", CostParts(1.0, 0.0, 0), 1.3)]
    fit = fit_price(data, node_ms=0.0, rest_ms=0.0)
    assert 1.15 < fit.op_scale < 1.25
    block = fit.to_dict({"big": 100.0, "small": 1.0})
    assert block["max_abs_error"] == pytest.approx(max(abs(e) for e in fit.errors().values()), abs=1e-4)
    assert {m["model"] for m in block["models"]} == {"big", "small"}
    assert block["models"][0]["predicted_uncalibrated_ms"] == 100.0


def test_the_table_prices_parts_with_its_calibration_and_keeps_the_block() -> None:
    body = synthetic_table([geometry("a", 32, 32)], batches=(1, 8))
    body.update(cache_bytes=1 << 20, op_scale={"1": 1.25, "8": 1.0}, weight_ms_per_mb={"1": 0.5, "8": 0.0},
                node_ms={"1": 0.01, "8": 0.0}, calibration={"by_batch": {"1": {"max_abs_error": 0.05}}})
    table = LatencyTable.from_dict(body)
    parts = CostParts(2.0, 3.0, 2)
    assert table.price(parts, 1) == pytest.approx(1.25 * 2.0 + 0.5 * 3.0 + 0.01 * 2)
    assert table.price(parts, 8) == pytest.approx(2.0)
    assert CostParts(1.0, 2.0, 1) + CostParts(0.5, 0.0, 2) == CostParts(1.5, 2.0, 3)
    assert table.form_ms("a", "three-conv", (8, 8), 1) == pytest.approx(
        table.price(table.form_parts("a", "three-conv", (8, 8), 1), 1))
    again = LatencyTable.from_dict(table.to_dict())
    assert again.calibration == {"by_batch": {"1": {"max_abs_error": 0.05}}}


def test_an_overpriced_node_cost_is_refitted_and_a_supported_one_kept() -> None:
    """The measured per-node cost (a chain of tiny convs) can overprice the extra nodes of deploy forms inside a
    model: the fit then lowers it (never below 0) and recovers the rest of the price; where the data supports the
    measured value, it stays."""
    data = points(1.1, 0.02, 0.05, 0.0)  # the models' extra nodes cost nothing beyond their convs
    fit = fit_price(data, node_ms=0.004, rest_ms=0.05)
    assert fit.node_ms == pytest.approx(0.0, abs=1e-9) and fit.op_scale == pytest.approx(1.1, rel=1e-6)
    assert max(abs(e) for e in fit.errors().values()) < 1e-6
    kept = fit_price(points(1.1, 0.02, 0.05, 0.004), node_ms=0.004, rest_ms=0.05)
    assert kept.node_ms == pytest.approx(0.004, rel=1e-6)
    # and the measured one is what the fit would have used: with it the error would not be 0
    stale = CalibrationPoint("m", PARTS[3], 0.05 + 1.1 * PARTS[3].alone_ms)
    assert abs((0.05 + 1.1 * PARTS[3].alone_ms + 0.004 * PARTS[3].extra_nodes) / stale.measured_ms - 1) > 0.1


# ------------------------------------------------------------------------------------------ spill

SPILL_PARTS = [CostParts(alone, 0.0, nodes, weight) for alone, nodes, weight in
               [(0.3, 30, 0.5), (0.5, 20, 1.0), (0.6, 34, 2.0), (1.1, 10, 3.0), (1.4, 26, 5.0), (2.6, 12, 8.0),
                (3.1, 0, 12.0), (4.0, 18, 20.0), (9.5, 0, 40.0)]]


def spill_points(rate: float, cache: float) -> list[CalibrationPoint]:
    """Models priced 0.03 + 1.1 x alone + 0.002 per extra node + 0.02 ms per weight MiB, + `rate` per MiB beyond
    `cache`."""
    return [CalibrationPoint(f"m{i}", p, 0.03 + 1.1 * p.alone_ms + 0.002 * p.extra_nodes + 0.02 * p.weight_mib
                             + rate * max(0.0, p.weight_mib - cache)) for i, p in enumerate(SPILL_PARTS)]


def test_fit_finds_the_spill_of_weights_beyond_a_shared_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models whose weights exceed a shared cache pay per MiB beyond it: the fit finds the rate and the cache
    size (on its grid, ~1.2x apart here) and predicts every model within 1%; the per-op terms alone cannot."""
    data = spill_points(0.06, 6.0)
    fit = fit_price(data, node_ms=0.002, rest_ms=0.03)
    assert fit.spill_ms_per_mb == pytest.approx(0.06, rel=0.15)
    assert 6.0 / 1.25 <= fit.spill_cache_mib <= 6.0 * 1.25
    assert max(abs(e) for e in fit.errors().values()) < 0.01
    assert fit.predict(SPILL_PARTS[-1]) == pytest.approx(data[-1].measured_ms, rel=0.01)
    block = fit.to_dict()
    assert block["spill_ms_per_mb"] == fit.spill_ms_per_mb and block["spill_cache_mib"] == fit.spill_cache_mib
    monkeypatch.setattr("cstar.latency_fit.spill_caches", lambda weights, floor_mib=0.0: [])
    per_op = fit_price(data, node_ms=0.002, rest_ms=0.03)
    assert per_op.spill_ms_per_mb == 0.0 and max(abs(e) for e in per_op.errors().values()) > 0.05


def test_no_spill_in_the_data_fits_no_spill() -> None:
    fit = fit_price(spill_points(0.0, 6.0), node_ms=0.002, rest_ms=0.03)
    assert fit.spill_ms_per_mb == 0.0 and fit.stream_ms_per_mb == pytest.approx(0.02, rel=1e-6)
    assert max(abs(e) for e in fit.errors().values()) < 1e-9


def test_a_spill_cache_leaves_two_models_on_each_side() -> None:
    """One model alone above (or below) the cache would set the rate to fit that model exactly."""
    assert spill_caches(np.array([1.0, 2.0, 3.0])) == []
    weights = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    caches = spill_caches(weights)
    assert caches and all((weights <= c).sum() >= 2 and (weights > c).sum() >= 2 for c in caches)
    assert min(spill_caches(weights, floor_mib=3.0)) >= 3.0
    assert spill_caches(weights, floor_mib=16.0) == []  # every model fits the per-core cache: nothing spills
    small = spill_points(0.06, 6.0)[:5]  # 0.5-5 MiB of weights, all below a 6 MiB per-core cache
    assert fit_price(small, node_ms=0.002, rest_ms=0.03, spill_floor_mib=6.0).spill_ms_per_mb == 0.0
