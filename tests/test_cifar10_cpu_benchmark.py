"""benchmarks/cifar10_cpu.py's arithmetic: speedups from one interleaved run, mean +- std over seeds, the plan."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import cifar10_cpu as bench


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.resolve_defaults(parser.parse_args(["--data", "x", "--part", "report", *extra]))


def _row(method: str, seed: int, robust: float, p50: float) -> dict:
    cells = {"ort-cpu/fp32": {"1": {"p50_ms": p50}}}
    return {"method": method, "target": 2.0, "seed": seed, "suite": "apgd", "clean_acc": robust + 0.3,
            "robust_acc": robust, "pgd20_robust_acc": robust + 0.04, "latency": cells,
            "speedup": bench.speedups({"dense": {"ort-cpu/fp32": {"1": {"p50_ms": 1.0}},
                                                 "ort-cpu/int8": {"1": {"p50_ms": 0.5}}}, "m": cells}, "m", "1"),
            "deploy": {"verify": {"ort-cpu/fp32": {"worst_case_robust_acc": robust - 0.01}}}}


def test_speedups_against_the_same_build_and_the_dense_models_fastest() -> None:
    row = _row("cstar", 0, 0.3, 0.4)
    assert row["speedup"]["vs_same"]["ort-cpu/fp32"] == pytest.approx(2.5)
    assert row["speedup"]["vs_dense_best"]["ort-cpu/fp32"] == pytest.approx(1.25)  # dense INT8 0.5 ms is fastest
    assert row["speedup"]["dense_best"] == "ort-cpu/int8"


def test_summary_is_mean_and_std_over_seeds_and_names_the_suite() -> None:
    parts = {"x2-s0": {"rows": [_row("cstar", 0, 0.30, 0.40), _row("prune", 0, 0.28, 0.50)]},
             "x2-s1": {"rows": [_row("cstar", 1, 0.34, 0.60), _row("prune", 1, 0.29, 0.50)]}}
    summary = bench.summary_rows(parts, _args("--methods", "cstar,prune", "--targets", "2"))
    cstar = next(s for s in summary if s["method"] == "cstar")
    assert cstar["n_seeds"] == 2 and cstar["seeds"] == [0, 1] and cstar["suite"] == "apgd"
    assert cstar["robust"]["mean"] == pytest.approx(0.32) and cstar["robust"]["std"] == pytest.approx(0.02 * 2 ** 0.5)
    assert cstar["p50_ms"]["ort-cpu/fp32"]["mean"] == pytest.approx(0.5)
    assert cstar["speedup_vs_same"]["ort-cpu/fp32"]["mean"] == pytest.approx((2.5 + 1 / 0.6) / 2)


def test_plan_fits_the_budget_with_two_threads_not_with_one() -> None:
    manifest = {"train_seconds": 2400.0, "config": {"epochs": 15}}
    two = bench.plan(_args("--torch-threads", "2"), manifest)
    one = bench.plan(_args("--torch-threads", "1"), manifest)
    assert two["fits"] and not one["fits"]
    assert one["total_seconds"] == pytest.approx(two["total_seconds"] * bench.THREAD_SPEEDUP[2])
    assert list(two["parts"]) == ["profile", "x2-s0", "x2.5-s0", "x2-s1", "x2.5-s1"]
    assert max(two["parts"].values()) <= bench.PART_LIMIT_SECONDS


def test_unknown_part_is_a_clear_error() -> None:
    from cstar.errors import CstarError

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(CstarError, match="unknown part 'x2'") as caught:
        bench.resolve_defaults(parser.parse_args(["--data", "x", "--part", "x2"]))
    assert "x2-s0" in caught.value.hint  # the valid parts are listed
