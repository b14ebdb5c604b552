"""`cstar compress`: a robust dense checkpoint -> a factorized (CSTAR, uniform low-rank) or pruned robust model.

    cstar compress --from DENSE_DIR --ratio 8 [--by params|flops] [--method cstar|prune|lowrank-uniform|hybrid] --out DIR
    cstar compress --from DENSE_DIR --ratio 4 --by latency --latency-table TABLE [--latency-batch 1] --out DIR

Every method gets the same adversarial training recipe and epoch budget (ADMM epochs + fine-tune
epochs for CSTAR; the baselines fine-tune for the sum), so their comparison is fair. The output is
a compress-stage checkpoint (cstar.checkpoint.save_checkpoint) whose manifest records the source,
the threat model, test metrics (PGD-20), the compression ratios counted on the saved model and the
per-layer rank map. See docs/method.md for the method.

Same budget for every method: the layers CSTAR keeps dense (stem conv and classifier, unless
`--compress-ends`) keep their weights in every method; for pruning that leaves whole the channel groups
those layers produce or consume (cstar.baselines). The manifest's `dense_layers` records what each
method left dense. `hybrid` (cstar.hybrid) prunes to a share of the budget, then runs CSTAR on the rest.

Scale-out: under `torchrun --nproc_per_node N -m cstar compress ...` the ADMM W-steps and the
fine-tuning are DDP training over DistributedSampler shards (per-rank batch `batch_size`), the rank
allocation and Z/U are broadcast from rank 0, test metrics are sharded and summed, and rank 0
alone writes the output directory. `--amp`, `--channels-last` and `--workers` act as in `cstar train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cstar import validate
from cstar.config import TRAIN_METHODS
from cstar.errors import CstarError
from cstar.stage_metrics import EvalSpec, add_eval_arguments, metrics_summary, stage_metrics

METHODS = ("cstar", "prune", "lowrank-uniform", "hybrid")  # the names of COMPRESSION_METHODS (a test checks they agree)
BUDGETS = ("params", "flops", "latency")  # cstar.ranks.BUDGETS; latency needs a `cstar profile` table
FACTOR_DECAYS = ("factors", "frobenius")  # cstar.train.FACTOR_DECAYS, repeated so this module stays torch-free


@dataclass
class CompressConfig:
    """Everything `run_compress` needs besides the directories (recorded in the manifest)."""

    ratio: float = 8.0
    by: str = "params"
    method: str = "cstar"
    admm_epochs: int = 5
    finetune_epochs: int = 15
    rho: float = 0.1
    rho_growth: float = 3.0
    rho_max: float = 10.0
    sweeps: int = 2
    realloc_epochs: int = 2
    rank_step: int = 1
    keep_first_last: bool = True  # every method keeps the stem conv and classifier dense (False: --compress-ends)
    hybrid_prune_share: float = 0.5  # hybrid: share of the log-ratio spent on pruning (0.5: prune sqrt(ratio))
    train_method: str | None = None  # None: the source's training method (TRAIN_METHODS), else pgd-at
    train_steps: int | None = None  # None: the source's PGD steps while training, else 5
    lr: float = 0.02
    finetune_lr: float = 0.03
    optimizer: str = "sgd"
    batch_size: int = 64
    weight_decay: float = 5e-4
    factor_decay: str = "factors"  # fine-tuning of factorized layers: decay each factor, or "frobenius" (W)
    val_fraction: float = 0.1
    eval_suite: str = "aa"  # test metrics: the suite's worst case (cstar.robust_eval; aa, apgd, pgd20)
    eval_steps: int | None = None  # the suite's gradient-attack iterations (None: the suite's standard)
    eval_queries: int | None = None  # Square's queries in the aa suite (None: 5000)
    eval_limit: int | None = None
    eval_dense: bool = True
    distill: float = 0.0  # weight of the dense model's soft labels in every method's adversarial loss (0: off)
    distill_temperature: float = 1.0
    latency_table: str | None = None  # `cstar profile` table: the budget for --by latency (else recorded only)
    # the table's batch size whose latencies count, or several ("1,8" / [1, 8]): the budget then holds at each,
    # the first is the headline (reported; picks each layer's deploy form)
    latency_batch: int | str | list[int] | tuple[int, ...] = 1
    latency_backend: str | None = None  # the deploy backend the table must come from (None: the table's own)
    latency_threads: int | None = None  # warn when the table was profiled with another thread count
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available, else CPU
    amp: bool = False  # CUDA mixed precision (bf16 where supported, else fp16 + GradScaler), PGD included
    channels_last: bool = False  # channels_last memory format on CUDA
    workers: int = 0  # data-loader worker processes

    def validate(self) -> None:
        """Reject user mistakes with a hint."""
        if self.method not in METHODS:
            raise CstarError(f"unknown compression method '{self.method}'", f"use one of: {', '.join(METHODS)}")
        if self.by not in BUDGETS:
            raise CstarError(f"unknown budget '{self.by}'", "use --by params, --by flops or --by latency")
        if self.by == "latency" and not self.latency_table:
            raise CstarError("--by latency needs a latency table",
                             "profile the dense model first: cstar profile --model-from DENSE_DIR --backend ort-cpu "
                             "--out TABLE.json, then pass --latency-table TABLE.json")
        self.latency_batches  # noqa: B018 (validates: CstarError naming the fix)
        validate.ratio("--ratio", self.ratio)
        validate.device(self.device)
        eval_spec(self).check()
        for name in ("lr", "finetune_lr", "rho", "weight_decay"):
            validate.in_range(f"--{name.replace('_', '-')}", getattr(self, name), 0.0)
        if self.admm_epochs < 0 or self.finetune_epochs < 0:
            raise CstarError("epoch counts must be >= 0", "pass --admm-epochs / --finetune-epochs >= 0")
        if self.batch_size < 1:
            raise CstarError(f"batch size must be >= 1, got {self.batch_size}", "pass e.g. --batch-size 64")
        if self.workers < 0:
            raise CstarError(f"workers must be >= 0, got {self.workers}", "pass --workers 0 or more")
        if not 0.0 <= self.distill <= 1.0:
            raise CstarError(f"--distill must be in [0, 1], got {self.distill}", "pass e.g. --distill 0.5 (0: off)")
        if self.factor_decay not in FACTOR_DECAYS:
            raise CstarError(f"unknown factor decay '{self.factor_decay}'",
                             f"pass --factor-decay {' or '.join(FACTOR_DECAYS)}")
        if not 0.0 < self.hybrid_prune_share < 1.0:
            raise CstarError(f"--hybrid-prune-share must be in (0, 1), got {self.hybrid_prune_share}",
                             "pass e.g. --hybrid-prune-share 0.5 (use --method prune or cstar for the ends)")
        if not self.distill_temperature > 0.0:
            raise CstarError(f"--distill-temperature must be > 0, got {self.distill_temperature}",
                             "pass e.g. --distill-temperature 1")

    @property
    def latency_batches(self) -> tuple[int, ...]:
        """Every batch size the latency budget holds at (the first: the headline)."""
        from cstar.latency_table import latency_batches

        return latency_batches(self.latency_batch)

    @property
    def total_epochs(self) -> int:
        return self.admm_epochs + self.finetune_epochs


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar compress` (defaults: CompressConfig)."""
    defaults = CompressConfig()
    parser.add_argument("--from", dest="from_dir", required=True, help="train-stage directory (dense robust model)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace an existing compress directory at --out")
    parser.add_argument("--ratio", type=float, required=True, help="compression ratio, e.g. 8 (dense / compressed)")
    parser.add_argument("--by", choices=BUDGETS, default=defaults.by,
                        help="budget counted in params, FLOPs (MACs) or latency predicted by --latency-table")
    parser.add_argument("--latency-table", default=None,
                        help="latency table of the dense model on the deploy runtime (cstar profile); needed by "
                             "--by latency, recorded (predicted latencies) otherwise")
    parser.add_argument("--latency-batch", type=_batch_list, default=defaults.latency_batch,
                        help="batch size of the table whose latencies count (default 1), or a comma list (1,8): "
                             "the budget then holds at every one; the first is reported and picks the deploy forms")
    parser.add_argument("--latency-backend", default=None,
                        help="deploy backend the table must come from (default: the table's own backend)")
    parser.add_argument("--latency-threads", type=int, default=None,
                        help="runtime threads of the deployment: warn when the table used another count")
    parser.add_argument("--method", choices=METHODS, default=defaults.method)
    parser.add_argument("--admm-epochs", type=int, default=defaults.admm_epochs, help="CSTAR ADMM epochs")
    parser.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs,
                        help="adversarial fine-tuning epochs (baselines fine-tune admm+finetune epochs)")
    parser.add_argument("--train-method", choices=TRAIN_METHODS, default=None,
                        help="adversarial training loss (default: the source model's)")
    parser.add_argument("--train-steps", type=int, default=None, help="PGD steps while training (default: the source's)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="training batch size (per process under torchrun)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="SGD lr during ADMM (constant)")
    parser.add_argument("--finetune-lr", type=float, default=defaults.finetune_lr, help="peak lr of fine-tuning")
    parser.add_argument("--rho", type=float, default=defaults.rho, help="initial ADMM penalty")
    parser.add_argument("--distill", type=float, default=defaults.distill,
                        help="weight in [0,1] of the dense model's soft labels on the PGD examples (every method; 0: off)")
    parser.add_argument("--distill-temperature", type=float, default=defaults.distill_temperature,
                        help="softmax temperature of the distillation term")
    parser.add_argument("--factor-decay", choices=FACTOR_DECAYS, default=defaults.factor_decay,
                        help="weight decay of factorized layers in fine-tuning: on each factor, or on the product W "
                             "they form (Frobenius decay)")
    parser.add_argument("--rank-step", type=int, default=defaults.rank_step,
                        help="round ranks to multiples of this (e.g. 8 for SIMD-friendly channel counts)")
    parser.add_argument("--compress-ends", "--factorize-all", dest="compress_ends", action="store_true",
                        help="every method also compresses the stem conv and the classifier (default: all keep them "
                             "dense; pruning then leaves their channel groups whole)")
    parser.add_argument("--hybrid-prune-share", type=float, default=defaults.hybrid_prune_share,
                        help="--method hybrid: share of the log-ratio spent on channel pruning before CSTAR "
                             "(0.5: prune to sqrt(ratio))")
    add_eval_arguments(parser, defaults.eval_suite)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16 where supported)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format on CUDA")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="data-loader worker processes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _batch_list(text: str) -> int | tuple[int, ...]:
    """--latency-batch: "1" -> 1, "1,8" -> (1, 8) (argparse turns the CstarError into a usage error)."""
    from cstar.latency_table import latency_batches

    try:
        batches = latency_batches(text)
    except CstarError as error:
        raise argparse.ArgumentTypeError(f"{error.message} ({error.hint})") from None
    return batches[0] if len(batches) == 1 else batches


def main(args: argparse.Namespace) -> int:
    """Run the stage from parsed arguments and print a one-line summary."""
    config = CompressConfig(
        ratio=args.ratio, by=args.by, method=args.method, admm_epochs=args.admm_epochs,
        finetune_epochs=args.finetune_epochs, train_method=args.train_method, train_steps=args.train_steps,
        batch_size=args.batch_size, lr=args.lr, finetune_lr=args.finetune_lr, rho=args.rho, rank_step=args.rank_step,
        distill=args.distill, distill_temperature=args.distill_temperature, factor_decay=args.factor_decay,
        keep_first_last=not args.compress_ends, hybrid_prune_share=args.hybrid_prune_share,
        latency_table=args.latency_table, latency_batch=args.latency_batch, latency_backend=args.latency_backend,
        latency_threads=args.latency_threads,
        eval_suite=args.eval_suite, eval_steps=args.eval_steps, eval_queries=args.eval_queries,
        eval_limit=args.eval_limit, seed=args.seed, device=args.device,
        amp=args.amp, channels_last=args.channels_last, workers=args.workers,
    )
    from cstar import distributed as dist

    started = time.monotonic()
    try:
        manifest = run_compress(args.from_dir, args.out, config=config, progress=not args.quiet, force=args.force)
        main_rank = dist.is_main()
    finally:
        dist.cleanup()
    metrics, ratios = manifest["metrics"], manifest["compression"]
    if not main_rank:
        return 0
    print(
        f"compressed ({config.method}) -> {args.out}: params x{ratios['params_ratio']:.2f}, "
        f"flops x{ratios['flops_ratio']:.2f}, "
        + (f"predicted latency x{ratios['latency_ratio']:.2f}, " if "latency_ratio" in ratios else "")
        + f"{metrics_summary(metrics)}, "
        f"{time.monotonic() - started:.0f}s"
    )
    return 0


# ------------------------------------------------------------------------------------------ library


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
    cfg = _inherit_recipe(cfg, source)
    table = _latency_table(cfg, progress)
    dist.init_from_env(cfg.device)
    cfg = dataclasses.replace(cfg, device=str(_resolve_device(cfg.device)))
    dense, _ = load_checkpoint(from_dir, device=cfg.device)
    spec = DatasetSpec.from_dict(source["dataset"])
    eps, norm = float(source.get("eps", spec.default_eps)), str(source.get("norm", "linf"))
    _check_table_layers(table, dense, cfg)
    torch.manual_seed(cfg.seed)
    bundle = load_dataset_from_spec(spec)
    log = _logger(progress)
    compressed, details = _compress(dense, spec, bundle.train, cfg, eps, norm, log, table=table)
    compressed = compressed.to(cfg.device).eval()
    ratios = compression_ratios(dense, compressed, spec.input_shape, table, cfg.latency_batches)
    _check_ratio(ratios, cfg)
    test_x, test_y = _test_tensors(bundle, cfg)
    metrics = _evaluate(compressed, test_x, test_y, eps, norm, cfg)
    dense_metrics = _evaluate(dense, test_x, test_y, eps, norm, cfg) if cfg.eval_dense else None
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


def _inherit_recipe(cfg: CompressConfig, source: dict[str, Any]) -> CompressConfig:
    """Fill recipe fields left as None from the source's training config (same adversarial recipe)."""
    source_config = source["config"] if isinstance(source.get("config"), dict) else {}
    method = cfg.train_method or source_config.get("method")
    steps = cfg.train_steps or source_config.get("train_steps")
    return dataclasses.replace(
        cfg,
        train_method=method if method in TRAIN_METHODS else "pgd-at",
        train_steps=int(steps) if isinstance(steps, int) and steps > 0 else 5,
    )


def _resolve_device(name: str) -> Any:
    from cstar.train import resolve_device

    return resolve_device(name)


def compression_ratios(dense: Any, compressed: Any, input_shape: tuple[int, ...], table: Any = None,
                       latency_batch: int | tuple[int, ...] = 1) -> dict[str, float]:
    """params and FLOPs (MACs) ratios dense / compressed, counted on the real models (and the predicted
    latency ratio when a latency table is given: the dense model's measured latency over the compressed one's
    predicted, the smallest over the budget's batch sizes, each layer in the form fastest at the first)."""
    from cstar.flops import count_flops, count_params

    ratios = {
        "params_ratio": count_params(dense) / count_params(compressed),
        "flops_ratio": count_flops(dense, input_shape) / count_flops(compressed, input_shape),
        "params": count_params(compressed),
        "flops": count_flops(compressed, input_shape),
        "dense_params": count_params(dense),
        "dense_flops": count_flops(dense, input_shape),
    }
    if table is not None:
        from cstar.latency import reference_latency_ms
        from cstar.latency_table import latency_batches

        batches = latency_batches(latency_batch)
        dense_ms, compressed_ms = ({b: reference_latency_ms(m, table, b, batches[0]) for b in batches}
                                   for m in (dense, compressed))
        ratios.update(latency_ratio=min(dense_ms[b] / compressed_ms[b] for b in batches),
                      latency_ms=compressed_ms[batches[0]], dense_latency_ms=dense_ms[batches[0]])
    return ratios


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


def _check_ratio(ratios: dict[str, float], cfg: CompressConfig) -> None:
    achieved = ratios[f"{cfg.by}_ratio"]
    if achieved + 1e-9 < cfg.ratio:
        raise RuntimeError(f"internal error: achieved {cfg.by} ratio {achieved:.3f} < requested {cfg.ratio}")


def _logger(progress: bool) -> Any:
    from cstar.stage_log import StageLog

    return StageLog(progress, main_rank_only=True)


# ------------------------------------------------------------------------------------------ methods


@dataclass
class MethodResult:
    """What a compression method returns: the model to fine-tune, manifest details, fine-tuning epochs."""

    model: Any
    details: dict[str, Any]
    finetune_epochs: int


def _cstar_method(model: Any, budget: Any, cfg: CompressConfig, trainer: _Trainer, log: Any) -> MethodResult:
    """CSTAR: ADMM under the adversarial loss with global rank allocation, then Tucker-2 factorization."""
    from cstar.admm import AdmmConfig, factorize_model, run_admm

    admm_cfg = AdmmConfig(cfg.admm_epochs, cfg.rho, cfg.rho_growth, cfg.rho_max, cfg.sweeps,
                          cfg.realloc_epochs, cfg.rank_step)
    result = run_admm(model, budget, admm_cfg, trainer.admm_epoch(cfg.admm_epochs), progress=log.enabled)
    compressed = factorize_model(result.model, result.allocation.ranks, cfg.sweeps)
    details = {"allocation": _allocation_summary(result.allocation), "history": {"admm": result.history}}
    return MethodResult(compressed, details, cfg.finetune_epochs)


def _lowrank_uniform_method(model: Any, budget: Any, cfg: CompressConfig, trainer: _Trainer, log: Any
                            ) -> MethodResult:
    """Baseline: the same rank fraction in every layer, factorized at once, all epochs fine-tuning."""
    from cstar.admm import allocate_for, factorize_model

    allocation = allocate_for(model, budget, uniform=True)
    compressed = factorize_model(model, allocation.ranks, cfg.sweeps)
    return MethodResult(compressed, {"allocation": _allocation_summary(allocation), "history": {}}, cfg.total_epochs)


def _prune_method(model: Any, budget: Any, cfg: CompressConfig, trainer: _Trainer, log: Any) -> MethodResult:
    """Baseline: robust channel pruning to the same budget, all epochs fine-tuning."""
    from cstar.hybrid import prune_for_budget

    pruned = prune_for_budget(model, budget)
    return MethodResult(pruned.model, {"pruning": _pruning_summary(pruned), "history": {}}, cfg.total_epochs)


def _hybrid_method(model: Any, budget: Any, cfg: CompressConfig, trainer: _Trainer, log: Any) -> MethodResult:
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


MethodFn = Callable[[Any, Any, CompressConfig, "_Trainer", Any], MethodResult]
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


def compress_module(dense: Any, train_set: Any, input_shape: tuple[int, ...], cfg: CompressConfig, eps: float,
                    norm: str = "linf", table: Any = None, progress: bool = False) -> tuple[Any, dict[str, Any]]:
    """The stage's compression on an in-memory model: (compressed model, details incl. 'ranks'). `train_set` is
    a Dataset of ([0,1] image, label) pairs; `table` a LatencyTable for `by='latency'`. Recipe fields left None
    get the stage's defaults (pgd-at, 5 steps)."""
    from cstar.data import DatasetSpec

    cfg.validate()
    cfg = _inherit_recipe(dataclasses.replace(cfg, device=str(_resolve_device(cfg.device))), {})
    shape = cast(tuple[int, int, int], tuple(int(d) for d in input_shape))
    spec = DatasetSpec("in-memory", shape, ("0",), (0.0,) * shape[0], (1.0,) * shape[0], eps)
    return _compress(dense, spec, train_set, cfg, eps, norm, _logger(progress), table=table)


def _compress(dense: Any, spec: Any, train_set: Any, cfg: CompressConfig, eps: float, norm: str,
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
    trainer = _Trainer(train_set, cfg, eps, norm, progress=log.enabled, teacher=_teacher(dense, cfg))
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


def _allocation_summary(allocation: Any) -> dict[str, Any]:
    return {
        "by": allocation.by,
        "target_cost": allocation.target_cost,
        "planned_cost": allocation.total_cost,
        "energy": {name: round(value, 4) for name, value in allocation.energy.items()},
    }


# ----------------------------------------------------------------------------------------- training


class _Trainer:
    """The shared adversarial-training recipe (cstar.train) for ADMM and fine-tuning."""

    def __init__(self, train_set: Any, cfg: CompressConfig, eps: float, norm: str, progress: bool,
                 teacher: Any = None) -> None:
        self.cfg = cfg
        self.teacher = teacher
        self.eps = eps
        self.norm = norm
        self.progress = progress
        from cstar.train import split_train_val

        self.train_set, self.val_set = split_train_val(train_set, cfg.val_fraction, cfg.seed)

    def train_config(self, epochs: int, lr: float) -> Any:
        from cstar.train import TrainConfig

        values: dict[str, Any] = {
            "epochs": epochs, "batch_size": self.cfg.batch_size, "lr": lr, "optimizer": self.cfg.optimizer,
            "weight_decay": self.cfg.weight_decay, "factor_decay": self.cfg.factor_decay,
            "method": self.cfg.train_method, "eps": self.eps,
            "norm": self.norm, "train_steps": self.cfg.train_steps,
            "val_fraction": self.cfg.val_fraction, "seed": self.cfg.seed, "device": self.cfg.device,
            "amp": self.cfg.amp, "channels_last": self.cfg.channels_last, "workers": self.cfg.workers,
        }
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in values.items() if k in known})

    def admm_epoch(self, epochs: int) -> Any:
        """A W-step callable for run_admm: one adversarial epoch with the ADMM penalty as extra loss.

        Same loader (DistributedSampler shard, order a function of (seed, epoch)), DDP wrapper, AMP
        and channels_last handling as `cstar.train.fit`; prints images/s per epoch.
        """
        import torch

        from cstar import distributed as dist
        from cstar.train import make_optimizer, make_scaler, resolve_device, train_epoch

        tcfg = self.train_config(max(epochs, 1), self.cfg.lr)
        device = resolve_device(tcfg.device)
        loader = dist.make_loader(self.train_set, self.cfg.batch_size, shuffle=True, workers=tcfg.workers,
                                  seed=self.cfg.seed, pin_memory=device.type == "cuda")
        holder: dict[str, Any] = {}

        def one_epoch(model: Any, extra_loss: Any, epoch: int) -> dict[str, float]:
            if holder.get("model") is not model:  # constant lr: the rho schedule, not the lr, drives convergence
                model.to(device)
                if tcfg.channels_last and device.type == "cuda":
                    model.to(memory_format=torch.channels_last)
                holder.update(model=model, wrapped=dist.wrap_model(model, device),
                              optimizer=make_optimizer(model, tcfg), scaler=make_scaler(device, tcfg.amp))
            dist.set_epoch(loader, epoch)
            stats = train_epoch(holder["wrapped"], loader, holder["optimizer"], tcfg, scheduler=None,
                                extra_loss=extra_loss, desc=f"admm {epoch + 1}/{epochs}", progress=self.progress,
                                scaler=holder["scaler"], teacher=self.teacher)
            dist.sync_module(model)  # BatchNorm running statistics: rank 0's everywhere
            stats["loss"] = dist.mean_across_ranks(stats["loss"])
            stats["images_per_s"] *= dist.world_size()
            if self.progress and dist.is_main():
                print(f"admm {epoch + 1}/{epochs}: loss {stats['loss']:.3f} ({stats['seconds']:.1f}s, "
                      f"{stats['images_per_s']:.0f} img/s)", file=sys.stderr, flush=True)
            return _numeric(stats)

        return one_epoch

    def validate(self, model: Any) -> dict[str, float]:
        """Held-out clean / PGD accuracy (the fine-tuning's validation attack) of `model` as it is now:
        how much the factorization or pruning itself cost before any fine-tuning."""
        from cstar.data import to_tensors
        from cstar.train import evaluate, isolated_rng, resolve_device

        if self.val_set is None:
            return {}
        tcfg = self.train_config(1, self.cfg.finetune_lr)
        device = resolve_device(tcfg.device)
        model.to(device).eval()
        images, labels = to_tensors(self.val_set, limit=tcfg.val_limit)
        with isolated_rng(device, self.cfg.seed):
            val = evaluate(model, images, labels, self.eps, tcfg.val_steps, None, norm=self.norm, shard=True)
        return {"val_clean": float(val["clean_acc"]), "val_robust": float(val["robust_acc"])}

    def finetune(self, model: Any, epochs: int) -> tuple[Any, list[dict[str, Any]], int]:
        """Adversarial fine-tuning with cstar.train.fit (keeps the best robust-validation weights)."""
        from cstar.train import fit

        tcfg = self.train_config(epochs, self.cfg.finetune_lr)
        result = fit(model, self.train_set, self.val_set, tcfg, progress=self.progress, teacher=self.teacher)
        return result.model, [_numeric(h) for h in result.history], int(result.best_epoch)


def _numeric(stats: Any) -> dict[str, Any]:
    if not isinstance(stats, dict):
        return {}
    return {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (dict, list)) else v)
            for k, v in stats.items()}


# --------------------------------------------------------------------------------------- evaluation


def _test_tensors(bundle: Any, cfg: CompressConfig) -> tuple[Any, Any]:
    from cstar.stage_metrics import test_tensors

    return test_tensors(bundle, cfg.eval_limit, cfg.seed)


def eval_spec(cfg: CompressConfig) -> EvalSpec:
    """The attack suite of the test metrics, as the config names it."""
    return EvalSpec(cfg.eval_suite, cfg.eval_steps, cfg.eval_queries, seed=cfg.seed)


def _evaluate(model: Any, images: Any, labels: Any, eps: float, norm: str, cfg: CompressConfig) -> dict[str, Any]:
    """Test metrics under the config's suite (worst case); sharded over the ranks under torchrun."""
    return stage_metrics(model.to(cfg.device).eval(), images, labels, eps, norm, eval_spec(cfg))
