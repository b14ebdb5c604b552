"""One compression on an in-memory model: the registered method, then fine-tuning, then the rank map.
The stage (`run_compress`), the API (`compress_model`) and the benchmarks all go through here."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from cstar.compress.config import CompressConfig
from cstar.compress.methods import compression_method
from cstar.compress.trainer import Trainer
from cstar.config import TRAIN_METHODS
from cstar.stage_log import StageLog


def compress_module(dense: Any, train_set: Any, input_shape: tuple[int, ...], cfg: CompressConfig, eps: float,
                    norm: str = "linf", table: Any = None, progress: bool = False) -> tuple[Any, dict[str, Any]]:
    """The stage's compression on an in-memory model: (compressed model, details incl. 'ranks'). `train_set` is
    a Dataset of ([0,1] image, label) pairs; `table` a LatencyTable for `by='latency'`. Recipe fields left None
    get the stage's defaults (pgd-at, 5 steps)."""
    from cstar.data import DatasetSpec

    cfg.validate()
    cfg = inherit_recipe(dataclasses.replace(cfg, device=str(resolve_device(cfg.device))), {})
    shape = cast(tuple[int, int, int], tuple(int(d) for d in input_shape))
    spec = DatasetSpec("in-memory", shape, ("0",), (0.0,) * shape[0], (1.0,) * shape[0], eps)
    return compress_with_method(dense, spec, train_set, cfg, eps, norm, StageLog(progress, main_rank_only=True), table=table)


def compress_with_method(dense: Any, spec: Any, train_set: Any, cfg: CompressConfig, eps: float, norm: str,
              log: Any, table: Any = None) -> tuple[Any, dict[str, Any]]:
    """Run the registered method; returns (compressed model, manifest details incl. 'ranks')."""
    import copy

    from cstar import distributed as dist
    from cstar.admm import Budget, rank_map
    from cstar.baselines import pruned_rank_map
    from cstar.ranks import first_and_last

    method = compression_method(cfg.method)
    model = copy.deepcopy(dense).to(cfg.device)
    keep = first_and_last(model) if cfg.keep_first_last else ()
    budget = Budget(cfg.ratio, cfg.by, tuple(spec.input_shape), keep, cfg.rank_step,
                    latency_table=table, latency_batch=cfg.latency_batches)
    trainer = Trainer(train_set, cfg, eps, norm, progress=log.enabled, teacher=_teacher(dense, cfg))
    result = method(model, budget, cfg, trainer, log)
    compressed, details, epochs = result.model, result.details, result.finetune_epochs
    dist.sync_module(compressed)  # rank 0's factors everywhere (GPU SVDs need not agree bit for bit)
    details["before_finetune"] = trainer.validate(compressed)
    log(f"{cfg.method}: factorized/pruned to {cfg.by} budget 1/{cfg.ratio:g}; fine-tuning {epochs} epochs")
    if epochs > 0:
        compressed, details["history"]["finetune"], details["finetune_best_epoch"] = trainer.finetune(compressed, epochs)
    details["ranks"] = pruned_rank_map(dense, compressed) if cfg.method in ("prune", "hybrid") else rank_map(compressed)
    details["dense_layers"] = _dense_layers(details["ranks"], first_and_last(dense), cfg.keep_first_last)
    return compressed, details


def _dense_layers(ranks: dict[str, Any], ends: tuple[str, ...], keep_ends: bool) -> dict[str, Any]:
    """Manifest `dense_layers`: the ends policy, the end layers, and every conv/linear left at its dense shape."""
    return {"ends": "dense" if keep_ends else "compressed", "end_layers": list(ends),
            "layers": [name for name, entry in ranks.items() if entry["kind"] == "dense"]}


def _teacher(dense: Any, cfg: CompressConfig) -> Any:
    """The dense source as distillation teacher (a frozen copy on the training device), or None."""
    import copy

    from cstar.train import Teacher

    if cfg.distill <= 0.0:
        return None
    return Teacher(copy.deepcopy(dense).to(cfg.device), cfg.distill, cfg.distill_temperature)


def inherit_recipe(cfg: CompressConfig, source: dict[str, Any]) -> CompressConfig:
    """Fill recipe fields left as None from the source's training config (same adversarial recipe)."""
    source_config = source["config"] if isinstance(source.get("config"), dict) else {}
    method = cfg.train_method or source_config.get("method")
    steps = cfg.train_steps or source_config.get("train_steps")
    return dataclasses.replace(
        cfg,
        train_method=method if method in TRAIN_METHODS else "pgd-at",
        train_steps=int(steps) if isinstance(steps, int) and steps > 0 else 5,
    )


def resolve_device(name: str) -> Any:
    from cstar.train import resolve_device

    return resolve_device(name)



