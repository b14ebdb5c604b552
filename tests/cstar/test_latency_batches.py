"""A latency budget at several batch sizes (`--latency-batch 1,8`): every method meets it at each batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from cstar.admm import Budget, allocate_for, factorize_model
from cstar.cli import main as cli_main
from cstar.errors import CstarError
from cstar.hybrid import hybrid_compress, prune_for_budget
from cstar.latency import candidate_geometry, predicted_latency_ms
from cstar.latency_table import LatencyTable, latency_batches
from cstar.ranks import first_and_last
from tests.cstar.test_latency import SPEC, synthetic_table, tiny_model, write

RATIO = 1.4
BATCHES = (1, 8)
FACTOR_PENALTY_B8 = 1.3  # 1x1 factors cost 1.3x more at batch 8 than batch 1 x 8: factorizing pays less there


def batch_dependent_table() -> dict[str, Any]:
    """A table where the factor ops are relatively slower at batch 8 (memory-bound 1x1 convs), so a budget
    spent at batch 1 alone misses its ratio at batch 8."""
    body = synthetic_table(candidate_geometry(tiny_model(), SPEC.input_shape), batches=BATCHES)
    for layer in body["layers"].values():
        for op in ("in_factor", "out_factor"):
            layer["ms"]["8"][op] = [[FACTOR_PENALTY_B8 * v for v in row] for row in layer["ms"]["8"][op]]
    return body


def compressed(method: str, budget: Budget, model: nn.Module) -> nn.Module:
    if method in ("cstar", "lowrank-uniform"):
        return factorize_model(model, allocate_for(model, budget, uniform=method == "lowrank-uniform").ranks, sweeps=1)
    if method == "prune":
        return prune_for_budget(model, budget).model
    return hybrid_compress(model, budget, share=0.5).model


def speedups(table: LatencyTable, dense: nn.Module, model: nn.Module, form_batch: int = 1) -> dict[int, float]:
    """Predicted dense / compressed latency per batch, every layer in the form export picks (at `form_batch`)."""
    return {b: predicted_latency_ms(dense, table, b) / predicted_latency_ms(model, table, b, form_batch)
            for b in BATCHES}


def test_latency_batches_parse_one_or_a_list_and_refuse_the_rest() -> None:
    assert latency_batches(8) == (8,) and latency_batches("1,8") == (1, 8) and latency_batches([8, 1, 8]) == (8, 1)
    for bad in (0, "", "1,0", "a", [], [1.5], True, None):
        with pytest.raises(CstarError, match="--latency-batch must be one batch size"):
            latency_batches(bad)  # type: ignore[arg-type]


def test_a_batch_1_budget_alone_misses_at_batch_8_on_this_table() -> None:
    """The scenario the multi-batch budget is for (and what makes the next test able to fail)."""
    model, table = tiny_model(), LatencyTable.from_dict(batch_dependent_table())
    budget = Budget(RATIO, "latency", SPEC.input_shape, first_and_last(model), latency_table=table, latency_batch=1)
    reached = speedups(table, model, compressed("cstar", budget, model))
    assert reached[1] >= RATIO - 1e-9
    assert reached[8] < RATIO - 0.02


@pytest.mark.parametrize("method", ["cstar", "lowrank-uniform", "prune", "hybrid"])
def test_a_budget_at_two_batches_holds_at_each(method: str) -> None:
    model, table = tiny_model(), LatencyTable.from_dict(batch_dependent_table())
    budget = Budget(RATIO, "latency", SPEC.input_shape, first_and_last(model), latency_table=table,
                    latency_batch=BATCHES)
    reached = speedups(table, model, compressed(method, budget, model))
    assert min(reached.values()) >= RATIO - 1e-9, reached
    assert max(reached.values()) < 3 * RATIO, reached  # compressed to the budget, not far past it


def test_cstar_spends_the_binding_batch_within_one_grid_step() -> None:
    """cstar stops where no move fits: the tightest batch is near its target, not over-compressed."""
    model, table = tiny_model(), LatencyTable.from_dict(batch_dependent_table())
    budget = Budget(RATIO, "latency", SPEC.input_shape, first_and_last(model), latency_table=table,
                    latency_batch=BATCHES)
    allocation = allocate_for(model, budget)
    reached = speedups(table, model, factorize_model(model, allocation.ranks, sweeps=1))
    assert allocation.total_cost == pytest.approx(predicted_latency_ms(model, table, 1) / reached[1])
    assert min(reached.values()) < RATIO * 1.15, reached


def test_unreachable_multi_batch_budget_names_the_best_ratio() -> None:
    model, table = tiny_model(), LatencyTable.from_dict(batch_dependent_table())
    budget = Budget(1000.0, "latency", SPEC.input_shape, first_and_last(model), latency_table=table,
                    latency_batch=BATCHES)
    with pytest.raises(CstarError, match=r"not reachable.*at most [0-9.]+x"):
        allocate_for(model, budget)


def test_compress_cli_budget_at_two_batches(robust_digits_dir: Path, tmp_path: Path, capsys) -> None:
    table_path = write(tmp_path, batch_dependent_table())
    out = tmp_path / "c"
    code = cli_main(["compress", "--from", str(robust_digits_dir), "--out", str(out), "--ratio", str(RATIO),
                     "--by", "latency", "--latency-table", str(table_path), "--latency-batch", "1,8",
                     "--admm-epochs", "0", "--finetune-epochs", "0", "--eval-suite", "apgd", "--eval-steps", "1", "--eval-limit", "20",
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    latency = manifest["latency"]
    assert latency["batch"] == 1 and latency["batches"] == [1, 8]
    assert min(entry["predicted_speedup"] for entry in latency["by_batch"].values()) >= RATIO - 1e-9
    assert manifest["compression"]["latency_ratio"] == pytest.approx(
        min(entry["predicted_speedup"] for entry in latency["by_batch"].values()))
    assert manifest["config"]["latency_batch"] == [1, 8]


def test_compress_cli_refuses_a_bad_batch_list(robust_digits_dir: Path, tmp_path: Path, capsys) -> None:
    table_path = write(tmp_path, batch_dependent_table())
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compress", "--from", str(robust_digits_dir), "--out", str(tmp_path / "c"), "--ratio", "2",
                  "--by", "latency", "--latency-table", str(table_path), "--latency-batch", "1,0"])
    assert exit_info.value.code == 2
    assert "--latency-batch must be one batch size" in capsys.readouterr().err
    code = cli_main(["compress", "--from", str(robust_digits_dir), "--out", str(tmp_path / "d"), "--ratio", "2",
                     "--by", "latency", "--latency-table", str(table_path), "--latency-batch", "1,4", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "has no batch size 4" in err and err.count("error:") == 1


def test_export_picks_forms_at_the_first_batch_of_a_list(tmp_path: Path) -> None:
    from export.exporter import _load_table

    table_path = write(tmp_path, batch_dependent_table())
    loaded = _load_table(table_path, "8,1")
    assert loaded is not None and loaded.batch == 8
    with pytest.raises(CstarError, match="--latency-batch must be one batch size"):
        _load_table(table_path, "0")


def test_a_latency_ratio_divides_the_measured_dense_latency() -> None:
    """The budget is the dense model's MEASURED latency / R (the calibration's, else the profile's), spent on
    predicted compressed latencies: the additive prediction of the dense model is not what a ratio divides."""
    from cstar.latency import is_table_dense, reference_latency_ms

    model = tiny_model()
    body = synthetic_table(candidate_geometry(model, SPEC.input_shape))
    body["rest_ms"] = {"1": 0.001}  # a measured rest: the additive prediction of the dense model is now ~9% low
    plain = LatencyTable.from_dict(body)
    measured, predicted = plain.model_ms(1), predicted_latency_ms(model, plain, 1)
    assert measured / predicted > 1.05 and plain.dense_reference_ms(1) == measured
    calibrated_ms = 0.85 * predicted  # the dense model ran faster whole than its layers add up to (as measured)
    table = LatencyTable.from_dict({**body, "calibration": {"by_batch": {"1": {"models": [
        {"model": "dense", "measured_ms": calibrated_ms}, {"model": "tucker2-0.5", "measured_ms": 0.1}]}}}})
    assert table.dense_reference_ms(1) == pytest.approx(calibrated_ms)
    assert is_table_dense(model, table) and reference_latency_ms(model, table, 1) == pytest.approx(calibrated_ms)
    ratio = 1.2
    for method in ("cstar", "lowrank-uniform", "prune", "hybrid"):
        budget = Budget(ratio, "latency", SPEC.input_shape, first_and_last(model), latency_table=table)
        small = compressed(method, budget, model)
        assert not is_table_dense(small, table)
        assert reference_latency_ms(small, table, 1) == pytest.approx(predicted_latency_ms(small, table, 1))
        assert predicted_latency_ms(small, table, 1) <= calibrated_ms / ratio + 1e-9, method
        assert predicted_latency_ms(small, table, 1) > calibrated_ms / ratio / 1.5, method  # spent, not far past
