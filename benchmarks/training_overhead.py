"""Training cost of CSTAR vs plain PGD adversarial training, measured in one process on the same data.

Phases, each timed per epoch with the recipe `cstar compress` uses (cstar.compress internals, batch
size, PGD steps of the source model): plain PGD-AT epoch of the dense model; CSTAR ADMM epoch (the
W-step alone, and whole epochs incl. Z/U updates, rank re-allocation and the initial allocation);
fine-tune epoch of the factorized CSTAR model; fine-tune epoch of the robust channel-pruned model.
Also lists the wall time of every compress run found in the work directory.

    python benchmarks/training_overhead.py [--quick] [--ratio 8] [--epochs 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.artifacts import StageRun, read_json, resolve_dense, timing_of  # noqa: E402

BENCHMARK = "training_overhead"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    common.add_common_arguments(parser)
    parser.add_argument("--ratio", type=float, default=8.0, help="params ratio of the CSTAR/prune phases")
    parser.add_argument("--epochs", type=int, default=None, help="epochs timed per phase (default 3; quick 1)")
    parser.add_argument("--from-table-dir", default=None,
                        help="work directory of compression_table whose compress runs are listed (default: --work)")


# ------------------------------------------------------------------------------------------- setup


class Setup:
    """The dense model, the compress recipe and the shared data loader."""

    def __init__(self, dense: StageRun, ratio: float, seed: int) -> None:
        import torch
        from torch.utils.data import DataLoader

        from cstar.checkpoint import load_checkpoint
        from cstar.compress import CompressConfig, Trainer, inherit_recipe
        from cstar.data import DatasetSpec, load_dataset_from_spec

        source = dense.manifest
        self.spec = DatasetSpec.from_dict(source["dataset"])
        self.cfg = inherit_recipe(CompressConfig(ratio=ratio, method="cstar", seed=seed, device="cpu"), source)
        self.eps, self.norm = float(source.get("eps", self.spec.default_eps)), str(source.get("norm", "linf"))
        self.dense, _ = load_checkpoint(dense.directory)
        self.trainer = Trainer(load_dataset_from_spec(self.spec).train, self.cfg, self.eps, self.norm, progress=False)
        self.loader = DataLoader(self.trainer.train_set, batch_size=self.cfg.batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(seed))

    def recipe(self) -> dict[str, Any]:
        return {"batch_size": self.cfg.batch_size, "train_method": self.cfg.train_method,
                "train_steps": self.cfg.train_steps, "eps": self.eps, "norm": self.norm,
                "train_images": len(self.trainer.train_set),  # type: ignore[arg-type]
                "ratio": self.cfg.ratio, "by": self.cfg.by}


def timed_epochs(model: Any, setup: Setup, epochs: int, lr: float) -> list[dict[str, float]]:
    """`epochs` adversarial epochs of cstar.train.train_epoch on `model`; wall seconds and images/s each."""
    from cstar.train import make_optimizer, train_epoch

    tcfg = setup.trainer.train_config(epochs, lr)
    optimizer = make_optimizer(model, tcfg)
    out = []
    for _ in range(epochs):
        start = time.perf_counter()
        stats = train_epoch(model, setup.loader, optimizer, tcfg, progress=False)
        out.append({"seconds": time.perf_counter() - start, "images_per_s": float(stats["images_per_s"])})
    return out


# ------------------------------------------------------------------------------------------- phases


def phase_dense(setup: Setup, epochs: int) -> tuple[dict[str, Any], None]:
    """Plain PGD-AT of (a copy of) the dense model."""
    return {"epochs": timed_epochs(copy.deepcopy(setup.dense).train(), setup, epochs, setup.cfg.finetune_lr)}, None


def phase_admm(setup: Setup, epochs: int) -> tuple[dict[str, Any], Any]:
    """CSTAR ADMM (W-step timed alone and whole), then factorization; returns the factorized model."""
    from cstar.admm import AdmmConfig, Budget, factorize_model, run_admm
    from cstar.ranks import first_and_last

    cfg = setup.cfg
    model = copy.deepcopy(setup.dense)
    budget = Budget(cfg.ratio, cfg.by, tuple(setup.spec.input_shape), first_and_last(model), cfg.rank_step)
    admm_cfg = AdmmConfig(epochs, cfg.rho, cfg.rho_growth, cfg.rho_max, cfg.sweeps, cfg.realloc_epochs, cfg.rank_step)
    w_step = setup.trainer.admm_epoch(epochs)
    w_times: list[dict[str, float]] = []

    def timed_w_step(m: Any, extra_loss: Callable[[], Any], epoch: int) -> dict[str, float]:
        start = time.perf_counter()
        stats = w_step(m, extra_loss, epoch)
        w_times.append({"seconds": time.perf_counter() - start, "images_per_s": float(stats.get("images_per_s", 0))})
        return stats

    with common.stopwatch() as admm_total:
        result = run_admm(model, budget, admm_cfg, timed_w_step)
    with common.stopwatch() as factorize:
        compressed = factorize_model(result.model, result.allocation.ranks, cfg.sweeps)
    return {"epochs": w_times, "admm_total_seconds": admm_total["seconds"],
            "whole_epoch_seconds": admm_total["seconds"] / max(epochs, 1),
            "factorize_seconds": factorize["seconds"]}, compressed


def phase_finetune(setup: Setup, epochs: int, model: Any) -> tuple[dict[str, Any], None]:
    """Adversarial fine-tuning epochs of a compressed model."""
    return {"epochs": timed_epochs(model.train(), setup, epochs, setup.cfg.finetune_lr)}, None


def phase_prune(setup: Setup, epochs: int) -> tuple[dict[str, Any], None]:
    """Robust channel pruning to the same budget, then its fine-tune epochs."""
    from cstar.baselines import prune_to_budget
    from cstar.ranks import first_and_last

    cfg = setup.cfg
    keep = first_and_last(setup.dense) if cfg.keep_first_last else ()  # the ends stay dense, as compress does
    pruned = prune_to_budget(copy.deepcopy(setup.dense), tuple(setup.spec.input_shape), cfg.ratio, cfg.by,
                             keep_dense=keep).model
    return phase_finetune(setup, epochs, pruned)


def summarize(name: str, label: str, block: dict[str, Any], dense_seconds: float | None) -> dict[str, Any]:
    """Median per-epoch seconds, images/s and the ratio to the dense PGD-AT epoch."""
    seconds = statistics.median(e["seconds"] for e in block["epochs"])
    return {"phase": name, "label": label, "epoch_seconds": seconds,
            "images_per_s": statistics.median(e["images_per_s"] for e in block["epochs"]),
            "vs_dense": seconds / dense_seconds if dense_seconds else 1.0, **block}


def run_phases(setup: Setup, epochs: int) -> list[dict[str, Any]]:
    """All phases in order; one summary row each (ADMM adds a whole-epoch row)."""
    common.log("phase: dense PGD-AT")
    dense, _ = phase_dense(setup, epochs)
    rows = [summarize("dense_pgd_at", "dense, plain PGD-AT", dense, None)]
    base = rows[0]["epoch_seconds"]
    common.log("phase: CSTAR ADMM")
    admm, factorized = phase_admm(setup, epochs)
    rows.append(summarize("cstar_admm_w_step", "CSTAR ADMM epoch (W-step only)", admm, base))
    rows.append({**rows[-1], "phase": "cstar_admm_epoch", "label": "CSTAR ADMM epoch (W + Z/U + realloc)",
                 "epoch_seconds": admm["whole_epoch_seconds"], "vs_dense": admm["whole_epoch_seconds"] / base})
    common.log("phase: CSTAR fine-tune")
    rows.append(summarize("cstar_finetune", "CSTAR fine-tune epoch (factorized)",
                          phase_finetune(setup, epochs, factorized)[0], base))
    common.log("phase: prune fine-tune")
    rows.append(summarize("prune_finetune", "robust pruning fine-tune epoch", phase_prune(setup, epochs)[0], base))
    return rows


# --------------------------------------------------------------------------------------- compress runs


def compress_runs(compress_root: Path) -> list[dict[str, Any]]:
    """Wall time and epoch split of every finished compress run under `compress_root`."""
    rows = []
    for manifest_path in sorted(compress_root.glob("*/manifest.json")):
        manifest = read_json(manifest_path)
        history = manifest.get("history") or {}
        train_seconds = sum(float(h.get("seconds", 0.0)) for phase in history.values() for h in phase)
        config = manifest.get("config") or {}
        rows.append({"run": manifest_path.parent.name, "method": manifest.get("method"),
                     "ratio": (manifest.get("compression") or {}).get("target"),
                     "admm_epochs": config.get("admm_epochs"), "finetune_epochs": config.get("finetune_epochs"),
                     "train_epoch_seconds_sum": round(train_seconds, 2),
                     "wall_seconds": timing_of(manifest_path.parent)})
    return rows


# ------------------------------------------------------------------------------------------ markdown


def render(payload: dict[str, Any]) -> str:
    """NAME.md body."""
    recipe = payload["recipe"]
    head = (f"## Training overhead ({payload['data']}, x{recipe['ratio']:g} {recipe['by']})\n\n"
            f"{payload['epochs']} epoch(s) per phase, median shown; {recipe['train_images']} training images, batch "
            f"{recipe['batch_size']}, {recipe['train_method']} with {recipe['train_steps']} PGD steps (eps "
            f"{recipe['eps']:g}).\n\n")
    table = common.markdown_table(["phase", "epoch (s)", "images/s", "vs dense PGD-AT"],
                           [[r["label"], f"{r['epoch_seconds']:.2f}", f"{r['images_per_s']:.0f}",
                             f"{r['vs_dense']:.2f}x"] for r in payload["rows"]])
    runs = payload["compress_runs"]
    if not runs:
        return head + table
    run_table = common.markdown_table(
        ["compress run", "ADMM + fine-tune epochs", "sum of epoch seconds", "wall seconds (incl. eval)"],
        [[r["run"], f"{r['admm_epochs']} + {r['finetune_epochs']}", f"{r['train_epoch_seconds_sum']:.1f}",
          "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.1f}"] for r in runs])
    return head + table + "\n### Compress runs in the work directory\n\n" + run_table


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time the phases and write the results; returns the payload."""
    common.setup_torch(args.torch_threads)
    machine = common.machine_info()
    root = common.work_root(args.data, args.quick, args.work)
    epochs = args.epochs or (1 if args.quick else 3)
    with common.stopwatch() as total:
        dense = resolve_dense(args, root)
        setup = Setup(dense, args.ratio, args.seed)
        rows = run_phases(setup, epochs)
    table_root = Path(args.from_table_dir) if args.from_table_dir else root
    payload = {"machine": machine, "data": args.data, "dense_dir": str(dense.directory), "epochs": epochs,
               "recipe": setup.recipe(), "rows": rows, "compress_runs": compress_runs(table_root / "compress"),
               "torch_threads": args.torch_threads, "seconds": round(total["seconds"], 1)}
    return common.publish(common.result_name(BENCHMARK, args.data), payload, render(payload), args, total['seconds'])


main = common.entry_point(__doc__, add_arguments, run, None)


if __name__ == "__main__":
    sys.exit(main())
