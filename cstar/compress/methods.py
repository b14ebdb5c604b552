"""The compression methods by name (timm-style registry): CSTAR, uniform low-rank, robust pruning, hybrid.

The baselines fine-tune the untrained structure of cstar.compress.structure (the one structure-only path).
Each takes (model, budget, config, trainer, log) and returns the model to fine-tune, its manifest details
and how many fine-tuning epochs it gets, so every method shares one recipe and one epoch budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cstar.compress.config import CompressConfig
from cstar.compress.structure import compress_structure
from cstar.compress.trainer import Trainer
from cstar.errors import CstarError


@dataclass
class MethodResult:
    """What a compression method returns: the model to fine-tune, manifest details, fine-tuning epochs."""

    model: Any
    details: dict[str, Any]
    finetune_epochs: int


def _cstar_method(model: Any, budget: Any, cfg: CompressConfig, trainer: Trainer, log: Any) -> MethodResult:
    """CSTAR: ADMM under the adversarial loss with global rank allocation, then Tucker-2 factorization."""
    from cstar.admm import AdmmConfig, factorize_model, run_admm

    admm_cfg = AdmmConfig(cfg.admm_epochs, cfg.rho, cfg.rho_growth, cfg.rho_max, cfg.sweeps,
                          cfg.realloc_epochs, cfg.rank_step)
    result = run_admm(model, budget, admm_cfg, trainer.admm_epoch(cfg.admm_epochs), progress=log.enabled)
    compressed = factorize_model(result.model, result.allocation.ranks, cfg.sweeps)
    details = {"allocation": _allocation_summary(result.allocation), "history": {"admm": result.history}}
    return MethodResult(compressed, details, cfg.finetune_epochs)


def _lowrank_uniform_method(model: Any, budget: Any, cfg: CompressConfig, trainer: Trainer, log: Any
                            ) -> MethodResult:
    """Baseline: the same rank fraction in every layer, factorized at once, all epochs fine-tuning."""
    structure = compress_structure(model, budget, "lowrank-uniform", sweeps=cfg.sweeps)
    return MethodResult(structure.model, {"allocation": _allocation_summary(structure.allocation), "history": {}},
                        cfg.total_epochs)


def _prune_method(model: Any, budget: Any, cfg: CompressConfig, trainer: Trainer, log: Any) -> MethodResult:
    """Baseline: robust channel pruning to the same budget, all epochs fine-tuning."""
    structure = compress_structure(model, budget, "prune")
    return MethodResult(structure.model, {"pruning": _pruning_summary(structure.pruned), "history": {}},
                        cfg.total_epochs)


def _hybrid_method(model: Any, budget: Any, cfg: CompressConfig, trainer: Trainer, log: Any) -> MethodResult:
    """Hybrid: channel pruning to ratio**share, then CSTAR (ADMM + Tucker-2) to the full ratio of the dense cost."""
    from cstar.hybrid import prune_stage, residual_error, stage_summary

    stage = prune_stage(model, budget, cfg.hybrid_prune_share)
    log(f"hybrid: pruned {stage.prune_ratio:.2f}x, CSTAR {stage.residual.ratio:.2f}x on the pruned model")
    try:
        result = _cstar_method(stage.pruned.model, stage.residual, cfg, trainer, log)
    except CstarError as error:
        raise residual_error(stage, cfg.ratio, error) from None
    result.details.update(pruning=_pruning_summary(stage.pruned), hybrid=stage_summary(stage, cfg.hybrid_prune_share))
    return result


def _pruning_summary(pruned: Any) -> dict[str, Any]:
    return {"fraction": pruned.fraction, "kept": {k: list(v) for k, v in pruned.kept.items()},
            "unpruned_groups": list(pruned.frozen)}


MethodFn = Callable[[Any, Any, CompressConfig, "Trainer", Any], MethodResult]
# The compression methods by name (timm-style registry); `METHODS` (the CLI choices) must list the same names.
COMPRESSION_METHODS: dict[str, MethodFn] = {
    "cstar": _cstar_method,
    "prune": _prune_method,
    "lowrank-uniform": _lowrank_uniform_method,
    "hybrid": _hybrid_method,
}


def compression_method(name: str) -> MethodFn:
    """The registered method called `name`; a clear error listing the valid names otherwise."""
    try:
        return COMPRESSION_METHODS[name]
    except KeyError:
        raise CstarError(f"unknown compression method '{name}'",
                         f"use one of: {', '.join(COMPRESSION_METHODS)}") from None


def _allocation_summary(allocation: Any) -> dict[str, Any]:
    return {
        "by": allocation.by,
        "target_cost": allocation.target_cost,
        "planned_cost": allocation.total_cost,
        "energy": {name: round(value, 4) for name, value in allocation.energy.items()},
    }
