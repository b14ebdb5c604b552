"""The compress stage: a train-stage directory in, a compress-stage directory out (cstar.outdir's rule),
with the recipe inherited from the source, the latency table checked up front and the test metrics."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from cstar.compress.config import CompressConfig, eval_spec
from cstar.compress.engine import compress_with_method, inherit_recipe, resolve_device
from cstar.compress.ratios import check_ratio, compression_ratios
from cstar.errors import CstarError
from cstar.stage_log import StageLog
from cstar.stage_metrics import stage_metrics


def run_compress(
    from_dir: str | Path,
    out_dir: str | Path,
    ratio: float | None = None,
    by: str | None = None,
    method: str | None = None,
    config: CompressConfig | dict[str, Any] | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Compress the train-stage checkpoint in `from_dir` into `out_dir`; returns the written manifest.

    `ratio`/`by`/`method` override the same fields of `config` (a CompressConfig or a dict of its keys).
    Under torchrun (WORLD_SIZE > 1) it joins the process group; rank 0 alone writes `out_dir`.
    `out_dir` follows cstar.outdir's rule (`force` replaces an existing compress directory).
    """
    from cstar import distributed as dist
    from cstar.config import config_from_dict
    from cstar.manifest import read_manifest
    from cstar.outdir import OutputDir, holding, writing_rank

    cfg = _resolve_config(config, ratio, by, method, config_from_dict)
    claim = OutputDir(Path(out_dir), "compress", (from_dir, cfg.latency_table), force=force)
    with holding(claim if writing_rank() else None, out_dir) as work:
        _compress_into(from_dir, work, cfg, progress)
    dist.barrier()
    return read_manifest(out_dir, ["compress"])


def _compress_into(from_dir: str | Path, work: Path, cfg: CompressConfig, progress: bool) -> None:
    """The stage's work; rank 0 writes the checkpoint into `work` (the staged --out)."""
    import torch

    from cstar import distributed as dist
    from cstar.checkpoint import load_checkpoint, save_checkpoint
    from cstar.config import config_to_dict
    from cstar.data import DatasetSpec, load_dataset_from_spec
    from cstar.manifest import file_entry, read_manifest

    source = read_manifest(from_dir, ["train"])
    cfg = inherit_recipe(cfg, source)
    table = _latency_table(cfg, progress)
    dist.init_from_env(cfg.device)
    cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))
    dense, _ = load_checkpoint(from_dir, device=cfg.device)
    spec = DatasetSpec.from_dict(source["dataset"])
    eps, norm = float(source.get("eps", spec.default_eps)), str(source.get("norm", "linf"))
    _check_table_layers(table, dense, cfg)
    torch.manual_seed(cfg.seed)
    bundle = load_dataset_from_spec(spec)
    log = StageLog(progress, main_rank_only=True)
    compressed, details = compress_with_method(dense, spec, bundle.train, cfg, eps, norm, log, table=table)
    compressed = compressed.to(cfg.device).eval()
    ratios = compression_ratios(dense, compressed, spec.input_shape, table, cfg.latency_batches)
    check_ratio(ratios, cfg)
    test_x, test_y = test_split(bundle, cfg)
    metrics = evaluate(compressed, test_x, test_y, eps, norm, cfg)
    dense_metrics = evaluate(dense, test_x, test_y, eps, norm, cfg) if cfg.eval_dense else None
    body: dict[str, Any] = {
        "inputs": [file_entry(Path(from_dir) / "manifest.json"),
                   file_entry(Path(from_dir) / source["weights"]["file"])],
        "source": {"path": str(Path(from_dir).resolve()), "params": source.get("params"), "flops": source.get("flops")},
        "eps": eps,
        "norm": norm,
        "method": cfg.method,
        "config": config_to_dict(cfg),
        "metrics": metrics,
        "dense_metrics": dense_metrics,
        "compression": {**ratios, "target": cfg.ratio, "by": cfg.by},
        "ranks": details.pop("ranks"),
        **details,
    }
    if table is not None:
        from cstar.latency import latency_record

        body["latency"] = latency_record(table, cfg.latency_batches, dense, compressed)
        if isinstance(body.get("allocation"), dict):  # the allocator's sum has no spill: the model's prediction has
            body["allocation"]["planned_cost"] = body["latency"]["predicted_ms"]
    if dist.is_main():
        save_checkpoint(work, compressed.cpu(), "compress", source["model"]["name"],
                        source["model"].get("options", {}), spec, body)


def _resolve_config(config: CompressConfig | dict[str, Any] | None, ratio: float | None, by: str | None,
                    method: str | None, from_dict: Any) -> CompressConfig:
    if config is None:
        cfg = CompressConfig()
    elif isinstance(config, dict):
        cfg = from_dict(CompressConfig, config, "compress config")
    else:
        cfg = dataclasses.replace(config)
    overrides: dict[str, Any] = {k: v for k, v in (("ratio", ratio), ("by", by), ("method", method)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg


def _latency_table(cfg: CompressConfig, progress: bool) -> Any:
    """Load --latency-table up front (before any long work): backend and batch checked, mismatches warned."""
    if not cfg.latency_table:
        return None
    from cstar.latency_table import LatencyTable

    table = LatencyTable.load(cfg.latency_table)
    backend = cfg.latency_backend or table.backend
    if backend != table.backend:
        raise CstarError(f"the latency table {cfg.latency_table} was measured on backend '{table.backend}', "
                         f"not on '{backend}' (--latency-backend)",
                         f"profile on the deploy backend: cstar profile --backend {backend} ..., or drop "
                         "--latency-backend to use the table's")
    for batch in cfg.latency_batches:
        table.check_batch(batch)
    for warning in table.check_matches(backend, cfg.latency_threads):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return table


def _check_table_layers(table: Any, dense: Any, cfg: CompressConfig) -> None:
    """The table must price every conv/linear layer of the dense model (it was profiled on this model)."""
    if table is None:
        return
    from cstar.latency import layer_latencies

    layer_latencies(dense, table, cfg.latency_batches[0])



def test_split(bundle: Any, cfg: CompressConfig) -> tuple[Any, Any]:
    from cstar.stage_metrics import test_tensors

    return test_tensors(bundle, cfg.eval_limit, cfg.seed)



def evaluate(model: Any, images: Any, labels: Any, eps: float, norm: str, cfg: CompressConfig) -> dict[str, Any]:
    """Test metrics under the config's suite (worst case); sharded over the ranks under torchrun."""
    return stage_metrics(model.to(cfg.device).eval(), images, labels, eps, norm, eval_spec(cfg))
