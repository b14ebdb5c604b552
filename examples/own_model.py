"""Bring your own model: a network defined in this file (two branches that concatenate, not a ResNet), through
the whole chain with the Python API: train (adversarially) -> profile -> compress by measured latency ->
export -> INT8 -> build -> verify on the runtime -> bench. About 1-2 minutes on 2 cores (digits, 16x16, eps 0.1).

    python examples/own_model.py --out runs/own-model

The model is named by its import path, `own_model:make_net` (this file's directory is put on sys.path), so
every stage, in this process or a later `cstar` command run with PYTHONPATH=examples, rebuilds it the same
way. Each call returns a result object; printing it prints the line the CLI would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))


class TwoBranchNet(nn.Module):
    """A stem, then a 3x3 branch and a 1x1 branch whose features are concatenated, twice; pooled; linear."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, width, 3)
        self.block1 = Branches(width, width)
        self.block2 = Branches(2 * width, 2 * width, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


class Branches(nn.Module):
    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.wide = nn.Sequential(_conv_bn(cin, width, 3, stride), _conv_bn(width, width, 3))
        self.narrow = _conv_bn(cin, width, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.wide(x), self.narrow(x)], dim=1)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


def make_net(num_classes: int = 10, width: int = 16) -> nn.Module:
    """The factory cstar calls (it passes num_classes from the data)."""
    return TwoBranchNet(num_classes, width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the stage directories (new)")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)

    from deploy import api

    out, batch, quick_eval = args.out, 32, {"eval_suite": "apgd", "eval_limit": 150}
    dense = api.train("digits", out / "dense", model="own_model:make_net", model_options={"width": 16},
                      epochs=args.epochs, eps=0.1, **quick_eval)
    print(dense)
    table = api.profile(dense, out / "table.json", batch_sizes=(batch,))
    small = api.compress(dense, out / "compressed", ratio=1.5, by="latency", latency_table=table,
                         latency_batch=batch, admm_epochs=1, finetune_epochs=2, **quick_eval)
    print(small)
    onnx = api.export(small, out / "onnx", latency_table=table, latency_batch=batch)
    print(onnx)
    int8 = api.calibrate(onnx, out / "int8", data="digits", target="ort-cpu", samples=128, parity_samples=200)
    print(int8)
    fp32 = api.build(onnx, out / "build-fp32", backend="ort-cpu")
    built = api.build(int8, out / "build", backend="ort-cpu")
    attacks = api.attackset(small, "digits", out / "attackset", samples=150)
    reports = {name: api.verify(artifact, out / f"verify-{name}", attack_set=attacks, square_queries=100)
               for name, artifact in (("fp32", fp32), ("int8", built))}
    for name, report in reports.items():
        print(f"{name}: {report}")
    dense_onnx = api.export(dense, out / "dense-onnx")
    timing = api.bench(built, out / "bench", batch_sizes=[batch], compare=dense_onnx, iters=20, threads=1)
    print(timing, "(INT8 vs the dense FP32 export)")
    return 0 if reports["fp32"] else 1  # INT8 agreement is partly the CPU's kernels' call: reported, not the exit


if __name__ == "__main__":
    raise SystemExit(main())
