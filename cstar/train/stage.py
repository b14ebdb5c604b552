"""The `cstar train` stage: its options, the run directory (fresh, finished, interrupted) and the run."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from cstar import distributed as dist
from cstar import validate
from cstar.errors import CstarError
from cstar.stage_metrics import (
    add_eval_arguments,
    metrics_summary,
    spec_from_args,
    stage_metrics,
    test_tensors,
)
from cstar.train.config import DEFAULT_EPOCHS, METHODS, SCHEDULES, TrainConfig
from cstar.train.holdout import split_train_val
from cstar.train.loop import fit
from cstar.train.resume import STATE_NAME
from cstar.train.runtime import isolated_rng, resolve_device, seed_everything


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar train`."""
    parser.add_argument("--data", default="digits", help="dataset: digits, fashion-mnist[:PATH], cifar10:PATH, "
                        "imagefolder:PATH")
    parser.add_argument("--image-size", type=int, default=None, help="resize inputs (digits default 16)")
    parser.add_argument("--model", default=None, help="model registry name or import path package.module:factory (default depends on the dataset)")
    parser.add_argument("--model-options", default=None, metavar="JSON",
                        help="keyword arguments of the model builder as a JSON object (recorded in the manifest)")
    parser.add_argument("--width", type=int, default=None, help="base width for small-resnet/resnet18")
    parser.add_argument("--epochs", type=int, default=None, help="default depends on the dataset")
    parser.add_argument("--eps", type=float, default=None, help="Linf radius in [0,1] pixels (default: dataset's)")
    parser.add_argument("--method", default="pgd-at", choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--optimizer", default=TrainConfig.optimizer, choices=("sgd", "adam"))
    parser.add_argument("--schedule", default=TrainConfig.schedule, choices=SCHEDULES,
                        help="LR schedule (cyclic: the one-cycle schedule of fast adversarial training)")
    parser.add_argument("--train-steps", type=int, default=TrainConfig.train_steps, help="PGD steps while training")
    parser.add_argument("--trades-beta", type=float, default=TrainConfig.trades_beta)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16 where supported)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format on CUDA")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--augment", action="store_true", help="random crop/flip (CIFAR, ImageFolder)")
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every, metavar="N",
                        help="also save the resume state every N optimizer steps (0: only at epoch ends)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out (same arguments; the state is in OUT/.state)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    add_eval_arguments(parser)


def check_run_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """Classify `out` before training; returns the manifest of a finished run when resuming one.

    Fresh or absent: None. Finished (manifest whose weights verify): error, or with --resume that
    manifest. A manifest whose weights are missing or differ from its sha256: corrupt, never trusted.
    Weights or a resume state without a manifest: interrupted, needs --resume (and a state).
    """
    from cstar.checkpoint import WEIGHTS_NAME
    from cstar.manifest import MANIFEST_NAME, read_manifest, verify_file

    state = out / ".state" / STATE_NAME
    if (out / MANIFEST_NAME).exists():
        delete = f"delete {out} and re-run the training"
        try:
            manifest = read_manifest(out, ["train"])
            weights = manifest.get("weights")
            if not isinstance(weights, dict) or "file" not in weights or "sha256" not in weights:
                raise CstarError(f"{out}/{MANIFEST_NAME} names no weights file", delete)
            verify_file(out, str(weights["file"]), str(weights["sha256"]))
        except CstarError as exc:
            raise CstarError(f"corrupt run directory {out}: {exc.message}", delete) from exc
        if not resume:
            raise CstarError(f"{out} already holds a finished run", "pick another --out, or delete it first")
        return manifest
    if not resume and (state.exists() or (out / WEIGHTS_NAME).exists()):
        raise CstarError(f"{out} holds an interrupted run (no manifest.json yet)",
                         "pass --resume to continue it, or pick another --out")
    if resume and (out / WEIGHTS_NAME).exists() and not state.exists():
        raise CstarError(f"{out} holds an interrupted run without a resume state ({state} is missing)",
                         f"delete {out} and re-run the training")
    return None


def claim_run_dir(args: argparse.Namespace) -> Any:
    """The run directory's claim (cstar.outdir, resumable in place); None on ranks that never write.

    Refuses another stage's directory, user data and the dataset's own path; holds the lock while training.
    """
    from cstar.checkpoint import WEIGHTS_NAME
    from cstar.outdir import OutputDir, dataset_path, writing_rank

    claim = OutputDir(Path(args.out), "train", (dataset_path(args.data),), resumable=True,
                      own_files=(".state", WEIGHTS_NAME))
    return claim if writing_rank() else None


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Train as the CLI arguments say and write the train-stage directory; returns its manifest.

    Under torchrun every rank trains; rank 0 alone writes the state, the weights and the manifest (and
    holds the run directory's lock, cstar.outdir).
    """
    from cstar.outdir import holding

    with holding(claim_run_dir(args), args.out):
        return _train(args)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    """run_train's work, with the run directory claimed."""
    from cstar.checkpoint import save_checkpoint
    from cstar.data import load_dataset
    from cstar.manifest import read_manifest
    from cstar.models import build_model, default_model_for, model_options

    if args.epochs is not None and args.epochs < 1:
        raise CstarError(f"epochs must be >= 1, got {args.epochs}", "pass --epochs 1 or more")
    if args.eps is not None:
        validate.eps(args.eps)
    validate.device(args.device)
    out: Path = args.out
    finished = check_run_dir(out, args.resume)
    if args.resume and finished is None and not (out / ".state" / STATE_NAME).exists() and dist.is_main():
        print(f"note: --resume: {out} holds no saved training state; starting from scratch", file=sys.stderr,
              flush=True)
    if finished is not None:
        if dist.is_main():
            print(f"{out} already holds a finished run: nothing to resume", flush=True)
        return finished
    bundle = load_dataset(args.data, image_size=args.image_size, augment=args.augment)
    spec = bundle.spec
    if args.eps is not None:
        validate.eps(args.eps, dataset=spec.name)  # the warning above the dataset's usual range
    model_name = args.model or default_model_for(spec.name)
    options = model_options(args.width, getattr(args, "model_options", None))
    cfg = TrainConfig(
        epochs=args.epochs or DEFAULT_EPOCHS.get(spec.name, 30), batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, schedule=args.schedule, method=args.method, trades_beta=args.trades_beta,
        eps=spec.default_eps if args.eps is None else args.eps, train_steps=args.train_steps,
        seed=args.seed, device=args.device, amp=args.amp,
        channels_last=args.channels_last, workers=args.workers, checkpoint_every=args.checkpoint_every,
    )
    cfg.validate()
    eval_spec = spec_from_args(args, seed=cfg.seed)
    dist.init_from_env(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(model_name, spec, **options)
    train_set, val_set = split_train_val(bundle.train, cfg.val_fraction, cfg.seed)
    state_dir = out / ".state"
    if dist.is_main():
        state_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    result = fit(model, train_set, val_set, cfg, state_dir=state_dir)
    test_x, test_y = test_tensors(bundle, getattr(args, "eval_limit", None), cfg.seed)
    with isolated_rng(resolve_device(cfg.device), cfg.seed):
        metrics = stage_metrics(model, test_x, test_y, cfg.eps, cfg.norm, eval_spec)
    if dist.is_main():
        source = {"path": spec.data_arg, "sha256": None}
        save_checkpoint(out, model, "train", model_name, options, spec, {
            "inputs": [source], "eps": cfg.eps, "norm": cfg.norm,
            "config": {**cfg.__dict__, "data": args.data, "model": model_name, "world_size": dist.world_size()},
            "metrics": metrics,
            "history": result.history, "best_epoch": result.best_epoch, "train_seconds": result.seconds,
        })
        (state_dir / STATE_NAME).unlink(missing_ok=True)
        for stale in state_dir.glob(f".{STATE_NAME}.*"):  # a temp a SIGKILL left mid-checkpoint (atomic_target)
            stale.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # leave a finished run as weights + manifest only
            state_dir.rmdir()
    dist.barrier()
    manifest = read_manifest(out, ["train"])
    if dist.is_main():
        print(f"trained {model_name} on {spec.name} (eps {cfg.eps:g}, {cfg.method}) in {result.seconds:.0f}s: "
              f"{metrics_summary(metrics)}, "
              f"{manifest['params']} params -> {out}", flush=True)
    dist.cleanup()
    return manifest


def main(args: argparse.Namespace) -> int:
    run_train(args)
    return 0
