"""CIFAR-10 (JPEG copy) with ResNet-18 on one GPU: the robust compression table, sized to a time budget.

Steps: unpack the data (the .tar.gz of ../shared/data or a directory), probe the seconds of one
PGD-AT epoch on the GPU, split the budget into dense PGD-AT epochs and per-method compress epochs
(every method gets the same total), train the dense model (bf16 autocast, channels_last, random
crop/flip), then run compression_table.py on it. Writes the compression table files
(compression_table_cifar10.json/.md) and cifar10_gpu.json/.md (the plan, the probe, the GPU and the
measured per-epoch times of dense PGD-AT, the ADMM phase and fine-tuning) into --results-dir.

The budget is honest about what it buys: a few epochs, not the paper's 100+; the result files say
how many.

    python benchmarks/cifar10_gpu.py --data ../shared/data/cifar10-jpeg.tar.gz --budget-seconds 420
    python benchmarks/cifar10_gpu.py --quick --data DIR --device cpu   # smoke run of the code path
"""

from __future__ import annotations

import argparse
import math
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (
    common,  # noqa: E402
    compression_table,  # noqa: E402
)
from benchmarks.artifacts import ensure_dense, read_json  # noqa: E402

# Per dataset: eps (Linf, [0,1] pixels), model and width, whether to crop/flip, how results name it.
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {"eps": 8 / 255, "eps_text": "8/255", "model": "resnet18", "width": 64, "augment": True,
                "label": "CIFAR-10 (JPEG copy)"},
    "fashion-mnist": {"eps": 0.1, "eps_text": "0.1", "model": "small-resnet", "width": 16, "augment": False,
                      "label": "Fashion-MNIST (full 60k/10k)"},
}


def setting(args: argparse.Namespace) -> dict[str, Any]:
    """The DATASETS entry of --dataset."""
    return DATASETS[args.dataset]


def benchmark_name(args: argparse.Namespace) -> str:
    """Result file stem: cifar10_gpu or fashion-mnist_gpu."""
    return f"{args.dataset}_gpu"
# Shares of the budget (after the probe): dense training, all compress runs together; the rest
# goes to evaluation (PGD-20 and Square on every model) and start-up.
DENSE_SHARE, COMPRESS_SHARE = 0.40, 0.45
OVERHEAD = 1.25  # probe (pure GPU steps) -> real epoch (data loading, validation, logging)
# Per compress epoch relative to a dense one, evaluation (PGD-20, Square) and cuDNN autotuning
# included: measured 2.1x on an H200 for ResNet-18 at 8x (first planned at 1.3x, which overran).
COMPRESS_SLOWDOWN = 2.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    parser.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz, or the dataset's directory")
    parser.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS), help="which dataset --data holds")
    parser.add_argument("--work", default="/tmp/cstar-cifar10-gpu", help="working directory")
    parser.add_argument("--results-dir", default=None, help="where the result files go (default benchmarks/results)")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="wall budget of training + evaluation")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--model", default=None, help="default: resnet18 (cifar10), small-resnet (fashion-mnist)")
    parser.add_argument("--width", type=int, default=None, help="default: 64 (cifar10), 16 (fashion-mnist)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1, help="dense peak lr (cosine)")
    parser.add_argument("--train-steps", type=int, default=5, help="PGD steps while training")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--ratios", default="8")
    parser.add_argument("--methods", default="cstar,prune,lowrank-uniform")
    parser.add_argument("--dense-epochs", type=int, default=None, help="override the planned dense epochs")
    parser.add_argument("--compress-epochs", type=int, default=None, help="override the planned epochs per method")
    parser.add_argument("--eval-limit", type=int, default=2000, help="stratified test images for PGD-20")
    parser.add_argument("--square-samples", type=int, default=200)
    parser.add_argument("--square-queries", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1+1 epochs, few samples")
    parser.add_argument("--collect", default=None, metavar="WORK",
                        help="only assemble the result files from the finished runs under WORK (e.g. a run that hit "
                             "its time limit, copied back from the GPU machine); unfinished rows are listed as missing")
    parser.add_argument("--gpu-name", default=None, help="with --collect: the GPU the runs used")
    parser.add_argument("--gpu-machine-cpus", type=int, default=None, help="with --collect: CPU cores of that machine")
    parser.add_argument("--seed", type=int, default=0)
    common.add_allow_dirty(parser)


# -------------------------------------------------------------------------------------------- data


def unpack(data: str, work: Path) -> Path:
    """A directory holding CIFAR-10: `data` itself, or the .tar.gz unpacked once under `work`."""
    source = Path(data)
    if source.is_dir():
        return source
    if not source.is_file():
        raise SystemExit(f"error: {source} does not exist\nfix: pass the CIFAR-10 directory or cifar10-jpeg.tar.gz")
    target = work / "data"
    marker = target / ".unpacked"
    if not marker.is_file():
        common.log(f"unpacking {source} -> {target}")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(source) as archive:
            archive.extractall(target, filter="data")
        marker.write_text(source.name, encoding="utf-8")
    return target


# ------------------------------------------------------------------------------------------- probe


def probe_epoch_seconds(data_arg: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of one PGD-AT epoch, from timed GPU steps on random pixels (data loading excluded)."""
    import torch

    from cstar.data import load_dataset
    from cstar.models import build_model
    from cstar.train import TrainConfig, adversarial_loss, autocast_context, make_optimizer, resolve_device

    bundle = load_dataset(data_arg)
    device = resolve_device(args.device)
    cfg = TrainConfig(eps=setting(args)["eps"], batch_size=args.batch_size, lr=args.lr, train_steps=args.train_steps,
                      amp=device.type == "cuda", channels_last=device.type == "cuda")
    model = build_model(args.model, bundle.spec, width=args.width).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    x = torch.rand(args.batch_size, *bundle.spec.input_shape, device=device)
    y = torch.randint(0, bundle.spec.num_classes, (args.batch_size,), device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with autocast_context(device, cfg.amp):
            loss = adversarial_loss(model, x, y, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    warmup, timed = (1, 2) if args.quick else (5, 15)
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(timed):
        step()
    _sync(device)
    per_step = (time.perf_counter() - started) / timed
    n_train = int(round(len(bundle.train) * (1 - cfg.val_fraction)))  # type: ignore[arg-type]
    steps = math.ceil(n_train / args.batch_size)
    return {"seconds_per_step": round(per_step, 4), "steps_per_epoch": steps, "train_images": n_train,
            "epoch_seconds": round(per_step * steps, 2), "batch_size": args.batch_size,
            "train_steps": args.train_steps}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_epochs(probe: dict[str, Any], args: argparse.Namespace, n_methods: int, n_ratios: int) -> dict[str, Any]:
    """Dense epochs and per-method (ADMM, fine-tune) epochs that fit the remaining budget."""
    epoch = probe["epoch_seconds"] * OVERHEAD
    dense = args.dense_epochs or max(1, min(40, int(DENSE_SHARE * args.budget_seconds / epoch)))
    per_method = COMPRESS_SHARE * args.budget_seconds / (n_methods * n_ratios) / (epoch * COMPRESS_SLOWDOWN)
    total = args.compress_epochs or max(2, int(per_method))
    admm = max(1, round(0.3 * total))
    return {"dense_epochs": dense, "admm_epochs": admm, "finetune_epochs": total - admm,
            "estimated_epoch_seconds": round(epoch, 2)}


# -------------------------------------------------------------------------------------- the stages


def dense_argv(args: argparse.Namespace, cuda: bool) -> list[str]:
    """`cstar train` options of the dense run (besides data, out, epochs, eps, seed)."""
    argv = ["--model", args.model, "--width", str(args.width), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--train-steps", str(args.train_steps),
            "--workers", str(args.workers), "--device", args.device]
    if setting(args)["augment"]:
        argv.append("--augment")
    if cuda:
        argv += ["--amp", "--channels-last"]
    if args.quick:
        argv += ["--eval-suite", "apgd", "--eval-steps", "2"]
    return argv


def table_argv(args: argparse.Namespace, data_arg: str, dense_dir: Path, plan: dict[str, Any],
               cuda: bool, results_dir: str | None) -> list[str]:
    """compression_table.py options for the compress runs and their evaluation."""
    argv = ["--data", data_arg, "--dense-dir", str(dense_dir), "--work", str(Path(args.work) / "table"),
            "--ratios", args.ratios, "--methods", args.methods, "--admm-epochs", str(plan["admm_epochs"]),
            "--finetune-epochs", str(plan["finetune_epochs"]), "--eval-limit", str(args.eval_limit),
            "--square-samples", str(args.square_samples), "--square-queries", str(args.square_queries),
            "--device", args.device, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
            "--torch-threads", "0", "--seed", str(args.seed)]
    if cuda:
        argv += ["--amp", "--channels-last"]
    if results_dir:
        argv += ["--results-dir", results_dir]
    if args.allow_dirty:
        argv.append("--allow-dirty")
    return argv


def epoch_times(dense_dir: Path, table: dict[str, Any]) -> dict[str, Any]:
    """Median seconds per epoch: dense PGD-AT, and per compress run its ADMM and fine-tune phases."""
    import statistics

    def median(history: list[dict[str, Any]]) -> float | None:
        values = [float(h["seconds"]) for h in history if "seconds" in h]
        return round(statistics.median(values), 2) if values else None

    dense = read_json(dense_dir / "manifest.json")
    out: dict[str, Any] = {"dense_pgd_at": median((dense.get("metrics") or {}).get("history")
                                                  or dense.get("history") or [])}
    for row in table["rows"][1:]:
        manifest = read_json(Path(row["dir"]) / "manifest.json")
        history = manifest.get("history") or (manifest.get("details") or {}).get("history") or {}
        out[row["model"]] = {phase: median(history.get(phase) or []) for phase in ("admm", "finetune")}
    return out


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Assemble both result files from the finished stage directories under --collect."""
    from benchmarks.artifacts import StageRun, timing_of
    from cstar.manifest import read_manifest

    work = Path(args.collect)
    table_root = work / "table"
    dense = StageRun(work / "dense", read_manifest(work / "dense", ["train"]), timing_of(work / "dense"), True)
    rows = [compression_table.dense_row(dense, read_json(table_root / "dense_eval.json")["value"],
                                        read_json(table_root / "square" / "dense.json")["value"])]
    missing = []
    methods = [m for m in args.methods.split(",") if m]
    for ratio in [float(r) for r in args.ratios.split(",") if r]:
        for method in methods:
            found = sorted(p.parent for p in (table_root / "compress").glob(f"{method}-x{ratio:g}-e*/manifest.json"))
            square = table_root / "square" / f"{found[-1].name}.json" if found else None
            if not found or square is None or not square.is_file():
                missing.append(f"{method}-x{ratio:g}")
                continue
            run = StageRun(found[-1], read_manifest(found[-1]), timing_of(found[-1]), True)
            rows.append(compression_table.compressed_row(run, read_json(square)["value"]))
    cfg = next((r for r in rows[1:]), None)
    plan = {"dense_epochs": dense.manifest["config"]["epochs"],
            "admm_epochs": (cfg or {}).get("epochs", {}).get("admm"),
            "finetune_epochs": (cfg or {}).get("epochs", {}).get("finetune")}
    table = {"rows": rows, "comparison": compression_table.comparison(rows), "missing": missing}
    square = rows[0]["square"]
    machine = {"gpu": args.gpu_name, "cpu_model": "the GPU machine's CPU", "cpus_available": args.gpu_machine_cpus,
               "cpu_count": args.gpu_machine_cpus, "torch_threads": "default",
               "note": "runs made on the GPU machine; files assembled here with --collect"}
    payload = {"machine": machine, "versions": dense.manifest.get("versions"), "gpu": args.gpu_name,
               "torch": (dense.manifest.get("versions") or {}).get("torch"), "data": setting(args)["label"],
               "eps": setting(args)["eps"], "dataset": args.dataset,
               "model": dense.manifest.get("model", {}).get("name", args.model), "probe": None,
               "plan": plan, "budget_seconds": args.budget_seconds, "dense_seconds": dense.seconds,
               "eval": {"pgd_limit": rows[0]["n"], "square_samples": square["n"], "square_queries": square["queries"]},
               "epoch_seconds": epoch_times(dense.directory, table), **table}
    paths = common.write_results(benchmark_name(args), payload, render(payload), args.quick, args.results_dir,
                          allow_dirty=args.allow_dirty)
    common.log(f"wrote {paths[0]} and {paths[1]}" + (f"; missing rows: {', '.join(missing)}" if missing else ""))
    return payload


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Unpack, probe, plan, train, compress, evaluate; write the results."""
    import torch

    from cstar.train import resolve_device

    args.model = args.model or setting(args)["model"]
    args.width = args.width or setting(args)["width"]
    if args.collect:
        return collect(args)
    if args.quick:
        args.width, args.batch_size, args.eval_limit = min(args.width, 8), min(args.batch_size, 32), 40
        args.square_samples, args.square_queries, args.budget_seconds = 20, 20, min(args.budget_seconds, 60)
        args.dense_epochs, args.compress_epochs = args.dense_epochs or 1, args.compress_epochs or 2
    work = Path(args.work)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    with common.stopwatch() as total:
        data_arg = f"{args.dataset}:{unpack(args.data, work)}"
        probe = probe_epoch_seconds(data_arg, args)
        methods = [m for m in args.methods.split(",") if m]
        plan = plan_epochs(probe, args, len(methods), len([r for r in args.ratios.split(",") if r]))
        common.log(f"probe: {probe['epoch_seconds']:.1f}s per PGD-AT epoch; plan {plan}")
        with common.stopwatch() as dense_time:
            dense = ensure_dense(data_arg, work / "dense", plan["dense_epochs"], setting(args)["eps"], args.seed,
                                 extra=dense_argv(args, cuda))
        common.log(f"dense: {dense.manifest['metrics']}"[:300])
        table = compression_table.main_namespace(table_argv(args, data_arg, dense.directory, plan, cuda,
                                                            args.results_dir))
    payload = {
        "machine": common.machine_info(), "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__, "data": setting(args)["label"], "eps": setting(args)["eps"], "model": args.model,
        "dataset": args.dataset,
        "probe": probe, "plan": plan, "budget_seconds": args.budget_seconds,
        "dense_seconds": round(dense_time["seconds"], 1), "epoch_seconds": epoch_times(dense.directory, table),
        "eval": {"pgd_limit": args.eval_limit, "square_samples": args.square_samples,
                 "square_queries": args.square_queries},
        "rows": table["rows"], "comparison": table["comparison"], "missing": [],
        "seconds": round(total["seconds"], 1),
    }
    paths = common.write_results(benchmark_name(args), payload, render(payload), args.quick, args.results_dir,
                          allow_dirty=args.allow_dirty)
    common.log(f"wrote {paths[0]} and {paths[1]} ({total['seconds']:.0f}s)")
    return payload


def render(payload: dict[str, Any]) -> str:
    """cifar10_gpu.md body: the plan and the epoch times (the table itself is compression_table_cifar10.md)."""
    plan, times, ev = payload["plan"], payload["epoch_seconds"], payload["eval"]
    probe = payload["probe"]
    head = (f"## {payload['data']}, {payload['model']}, eps {payload['eps']:.4g} on {payload['gpu'] or 'CPU'}\n\n"
            f"Budget {payload['budget_seconds']:.0f} s: dense PGD-AT {plan['dense_epochs']} epochs, every compress "
            f"method {plan['admm_epochs']} + {plan['finetune_epochs']} epochs (CSTAR: ADMM + fine-tune; baselines "
            f"fine-tune the sum). PGD-20 on {ev['pgd_limit']} stratified test images, Square "
            f"({ev['square_queries']} queries) on {ev['square_samples']}."
            + (f" Probe: {probe['epoch_seconds']} s per PGD-AT epoch." if probe else "")
            + (f" Not finished within the GPU time: {', '.join(payload['missing'])}." if payload["missing"] else "")
            + "\n\n")
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [["dense PGD-AT", cell(times.get("dense_pgd_at")), "-"]]
    rows += [[name, cell(v.get("admm")), cell(v.get("finetune"))] for name, v in times.items() if isinstance(v, dict)]
    table = common.markdown_table(["run", "ADMM / train s per epoch", "fine-tune s per epoch"], rows)
    results = common.markdown_table(
        ["model", "params ratio", "FLOPs ratio", "clean %", "robust % (apgd worst case)", "Square %"],
        [[r["model"], f"{r['params_ratio']:.2f}x", f"{r['flops_ratio']:.2f}x", f"{100 * r['clean_acc']:.1f}",
          f"{100 * r['robust_acc']:.1f}", f"{100 * r['square_robust_acc']:.1f}"] for r in payload["rows"]])
    return head + results + "\n### Seconds per epoch (median)\n\n" + table


main = common.entry_point(__doc__, add_arguments, run, None)


if __name__ == "__main__":
    raise SystemExit(main())
