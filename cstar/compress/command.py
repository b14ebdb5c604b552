"""The `cstar compress` command: its options (defaults: CompressConfig) and the one-line summary."""

from __future__ import annotations

import argparse
import time

from cstar.compress.config import BUDGETS, METHODS, CompressConfig
from cstar.compress.stage import run_compress
from cstar.config import FACTOR_DECAYS, TRAIN_METHODS
from cstar.errors import CstarError
from cstar.stage_metrics import add_eval_arguments, metrics_summary


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
