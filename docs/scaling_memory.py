"""Peak host memory of one PGD-AT training step on CPU, by model and batch size (docs/scaling.md).

Each configuration runs in a fresh subprocess (ru_maxrss is a per-process high-water mark):
build the model at 3x32x32 / 10 classes, the SGD optimizer and a random batch, read the current
RSS, run one step of `cstar.train.train_epoch` (PGD-AT, `--train-steps` PGD steps, then the
train-mode forward/backward/SGD step), then report peak RSS minus the RSS before the step.

    .venv/bin/python docs/scaling_memory.py [--batches 16,64,256] [--models small-resnet,resnet18]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(model_name: str, batch: int, train_steps: int) -> dict[str, float | int | str]:
    """One PGD-AT step in this process: peak RSS delta (MiB) and wall seconds."""
    import resource
    import time

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from cstar.data import DatasetSpec
    from cstar.models import build_model
    from cstar.train import TrainConfig, make_optimizer, train_epoch

    torch.manual_seed(0)
    spec = DatasetSpec("synthetic", (3, 32, 32), tuple(str(i) for i in range(10)), (0.5,) * 3, (0.25,) * 3, 8 / 255)
    model = build_model(model_name, spec)
    cfg = TrainConfig(epochs=1, batch_size=batch, eps=8 / 255, train_steps=train_steps, device="cpu")
    optimizer = make_optimizer(model, cfg)
    data = TensorDataset(torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,)))
    loader = DataLoader(data, batch_size=batch)
    before = _rss_mib()
    started = time.perf_counter()
    train_epoch(model, loader, optimizer, cfg, progress=False)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for p in model.parameters())
    return {"model": model_name, "params": params, "batch": batch, "train_steps": train_steps,
            "rss_before_mib": round(before, 1), "peak_delta_mib": round(peak - before, 1),
            "step_seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small-resnet,resnet18")
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--train-steps", type=int, default=1, help="PGD steps (memory does not grow with them)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    print("| model | params | batch | PGD steps | RSS before (MiB) | peak delta (MiB) | step (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model in args.models.split(","):
        for batch in args.batches.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", model, batch, str(args.train_steps)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"| {row['model']} | {row['params']:,} | {row['batch']} | {row['train_steps']} | "
                  f"{row['rss_before_mib']} | {row['peak_delta_mib']} | {row['step_seconds']} |", flush=True)


if __name__ == "__main__":
    main()
