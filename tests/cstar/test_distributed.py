"""Scale-out: DDP under torchrun (2 CPU processes, gloo) and the ImageNet-style path.

One torchrun launch (module fixture) runs this file as a worker script on 2 ranks: an adversarial
fit (BatchNorm model, sharded validation), a clean fit of a BatchNorm-free model, and CSTAR ADMM
through cstar.compress's trainer. Each rank dumps what it ended with; the tests compare the ranks
(exactly) and the clean fit with a single-process run of the same global batch (to 1e-4).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from tests.conftest import requires_cuda

REPO = Path(__file__).resolve().parents[2]
PER_RANK_BATCH = 32
N_TRAIN = 256


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`python -m torch.distributed.run --nproc_per_node 2 ... ARGS` on CPU (gloo), from the repo root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _without_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm -> Identity: DDP keeps BN statistics per rank, which a single process cannot reproduce."""
    from cstar.checkpoint import set_submodule

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            set_submodule(model, name, nn.Identity())
    return model


def _plain_config(batch_size: int) -> Any:
    from cstar.train import TrainConfig

    # eps 0: PGD's random start draws per-rank noise of a different shape than one process would
    return TrainConfig(epochs=2, batch_size=batch_size, lr=0.05, eps=0.0, train_steps=1, device="cpu", seed=3)


def _plain_model(spec: Any) -> nn.Module:
    from cstar.models import build_model

    torch.manual_seed(0)
    return _without_batchnorm(build_model("small-resnet", spec, width=4))


# ---------------------------------------------------------------------------------- the worker


def _worker(out: Path) -> None:
    """What every rank runs (under torchrun): three phases, each dumping this rank's result."""
    import copy

    from cstar import distributed as dist
    from cstar.admm import AdmmConfig, Budget, factorize_model, run_admm
    from cstar.compress import CompressConfig, Trainer
    from cstar.data import load_dataset
    from cstar.models import build_model
    from cstar.ranks import first_and_last
    from cstar.train import TrainConfig, fit, seed_everything

    assert dist.init_from_env("cpu") and dist.world_size() == 2
    rank = dist.rank()
    bundle = load_dataset("digits")
    train, val = Subset(bundle.train, range(N_TRAIN)), Subset(bundle.train, range(N_TRAIN, N_TRAIN + 33))

    seed_everything(0)
    cfg = TrainConfig(epochs=2, batch_size=PER_RANK_BATCH, lr=0.05, eps=0.2, train_steps=1, val_steps=2,
                      device="cpu")
    adv = fit(build_model("small-resnet", bundle.spec, width=4), train, val, cfg, progress=False)
    torch.save({"state": adv.model.state_dict(), "history": json.dumps(adv.history), "best": adv.best_epoch},
               out / f"adv_{rank}.pt")

    plain = fit(_plain_model(bundle.spec), train, None, _plain_config(PER_RANK_BATCH), progress=False)
    torch.save({"state": plain.model.state_dict(), "history": json.dumps(plain.history)}, out / f"plain_{rank}.pt")

    ccfg = CompressConfig(ratio=2.0, batch_size=PER_RANK_BATCH, train_method="pgd-at", train_steps=1, device="cpu")
    model = copy.deepcopy(adv.model)
    budget = Budget(2.0, "params", tuple(bundle.spec.input_shape), first_and_last(model))
    trainer = Trainer(train, ccfg, eps=0.2, norm="linf", progress=False)
    result = run_admm(model, budget, AdmmConfig(epochs=2, realloc_epochs=1), trainer.admm_epoch(2))
    compressed = factorize_model(result.model, result.allocation.ranks)
    torch.save({"weights": result.model.state_dict(), "compressed": compressed.state_dict(),
                "ranks": json.dumps({k: list(v) if v else None for k, v in result.allocation.ranks.items()}),
                "history": json.dumps([{k: v for k, v in h.items() if k in ("rho", "residual", "ranks_total")}
                                       for h in result.history])}, out / f"admm_{rank}.pt")
    dist.cleanup()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    proc = _torchrun([str(Path(__file__).resolve()), str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            diff = (a[name].double() - b[name].double()).abs().max().item()
            assert diff <= atol, f"{name}: max |diff| {diff:.2e} > {atol}"


# ------------------------------------------------------------------------------------------- DDP


def test_ranks_end_with_identical_weights_and_metrics(ddp_run: Path) -> None:
    rank0, rank1 = _load(ddp_run / "adv_0.pt"), _load(ddp_run / "adv_1.pt")
    _assert_same_state(rank0["state"], rank1["state"])  # BN buffers too: re-synced from rank 0 each epoch
    assert rank0["best"] == rank1["best"]
    h0, h1 = json.loads(rank0["history"]), json.loads(rank1["history"])
    for row0, row1 in zip(h0, h1, strict=True):  # loss is all-reduced, validation sharded and summed
        assert (row0["loss"], row0["val_clean"], row0["val_robust"]) == (row1["loss"], row1["val_clean"],
                                                                         row1["val_robust"])


def test_two_ranks_match_one_process_with_the_global_batch(ddp_run: Path, digits: Any) -> None:
    """Per-rank batch B on 2 ranks == batch 2B in one process.

    The sampler deals randperm(n, seed + epoch) round-robin, so step t of the two ranks together
    covers positions [2Bt, 2B(t+1)) of the permutation: exactly one process's batch t. DDP averages
    the two per-rank mean gradients = the mean over 2B. What differs is float summation order
    (within-batch order, all-reduce), ~1e-7 relative per step over 16 steps: 1e-4 is generous.
    """
    from cstar.train import fit

    rank0, rank1 = _load(ddp_run / "plain_0.pt"), _load(ddp_run / "plain_1.pt")
    _assert_same_state(rank0["state"], rank1["state"])
    single = fit(_plain_model(digits.spec), Subset(digits.train, range(N_TRAIN)), None,
                 _plain_config(2 * PER_RANK_BATCH), progress=False)
    _assert_same_state(rank0["state"], single.model.state_dict(), atol=1e-4)
    losses = [row["loss"] for row in json.loads(rank0["history"])]
    assert losses == pytest.approx([row["loss"] for row in single.history], abs=1e-4)


def test_admm_state_and_ranks_are_identical_on_every_rank(ddp_run: Path) -> None:
    rank0, rank1 = _load(ddp_run / "admm_0.pt"), _load(ddp_run / "admm_1.pt")
    assert rank0["ranks"] == rank1["ranks"] and rank0["history"] == rank1["history"]  # rho, residual (uses Z)
    _assert_same_state(rank0["weights"], rank1["weights"])
    _assert_same_state(rank0["compressed"], rank1["compressed"])
    assert any(r is not None for r in json.loads(rank0["ranks"]).values())


def test_cli_train_under_torchrun_writes_one_manifest(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _torchrun(["-m", "cstar", "train", "--data", "digits", "--width", "4", "--epochs", "1", "--train-steps",
                      "1", "--eval-suite", "apgd", "--eval-steps", "1", "--checkpoint-every", "4", "--device", "cpu", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]
    assert proc.stdout.count("trained small-resnet") == 1  # rank 0 alone reports and writes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["world_size"] == 2 and manifest["metrics"]["n"] == 360


def test_cli_compress_under_torchrun_writes_one_manifest(robust_digits_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    proc = _torchrun(["-m", "cstar", "compress", "--from", str(robust_digits_dir), "--out", str(out), "--ratio", "2",
                      "--admm-epochs", "1", "--finetune-epochs", "1", "--train-steps", "1", "--eval-suite", "apgd", "--eval-steps", "1",
                      "--eval-limit", "41", "--device", "cpu", "--quiet"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]
    assert proc.stdout.count("compressed (cstar)") == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compression"]["params_ratio"] >= 2.0 and manifest["metrics"]["n"] == 41  # odd: uneven shards


@requires_cuda
def test_amp_channels_last_fit_on_gpu(digits: Any) -> None:
    """The GPU path: autocast (bf16 or fp16 + GradScaler) for training and PGD, channels_last, pinned loader."""
    from cstar.models import build_model
    from cstar.train import TrainConfig, fit

    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, eps=0.2, train_steps=2, val_steps=2, val_limit=64,
                      device="cuda", amp=True, channels_last=True, workers=2)
    train = Subset(digits.train, range(512))
    result = fit(build_model("small-resnet", digits.spec, width=8), train, Subset(digits.train, range(512, 576)),
                 cfg, progress=False)
    row = result.history[0]
    assert row["images_per_s"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
    assert next(result.model.parameters()).is_cuda


# ------------------------------------------------------------------------------- ImageNet-style


def _image_tree(root: Path, classes: int = 4, per_split: dict[str, int] | None = None,
                size: tuple[int, int] = (44, 36)) -> Path:
    """A tiny random `train/<class>/*.png` + `test/<class>/*.png` tree (non-square images)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (per_split or {"train": 5, "test": 2}).items():
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def test_imagefolder_train_and_test_transforms(tmp_path: Path) -> None:
    from cstar.data import load_dataset
    from cstar.train import split_train_val

    root = _image_tree(tmp_path / "tree")
    bundle = load_dataset(f"imagefolder:{root}", image_size=32, augment=True)
    assert bundle.spec.input_shape == (3, 32, 32) and bundle.spec.num_classes == 4
    torch.manual_seed(0)
    crops = [bundle.train[0][0] for _ in range(4)]
    assert all(c.shape == (3, 32, 32) and c.dtype == torch.float32 for c in crops)
    assert float(torch.stack(crops).min()) >= 0.0 and float(torch.stack(crops).max()) <= 1.0
    assert any(not torch.equal(crops[0], c) for c in crops[1:])  # RandomResizedCrop + flip
    test_a, label = bundle.test[0]
    assert test_a.shape == (3, 32, 32) and int(label) == 0
    assert torch.equal(test_a, bundle.test[0][0])  # resize + center crop: deterministic
    _, val = split_train_val(bundle.train, 0.25, seed=0)
    assert val is not None and torch.equal(val[0][0], val[0][0])  # the held-out view is not augmented


def test_torchvision_resnet18_compresses_through_the_same_path(tmp_path: Path) -> None:
    from cstar.checkpoint import load_checkpoint, save_checkpoint
    from cstar.compress import run_compress
    from cstar.data import load_dataset
    from cstar.lowrank import LowRankConv2d
    from cstar.models import build_model

    root = _image_tree(tmp_path / "tree", per_split={"train": 3, "test": 2})
    bundle = load_dataset(f"imagefolder:{root}", image_size=32)
    torch.manual_seed(0)
    dense = build_model("tv-resnet18", bundle.spec)
    save_checkpoint(tmp_path / "dense", dense, "train", "tv-resnet18", {}, bundle.spec,
                    {"eps": 4 / 255, "norm": "linf", "metrics": {}, "config": {"method": "pgd-at", "train_steps": 1}})
    config = {"admm_epochs": 0, "finetune_epochs": 0, "eval_suite": "apgd", "eval_steps": 1, "eval_dense": False,
              "device": "cpu"}
    manifest = run_compress(tmp_path / "dense", tmp_path / "small", ratio=3.0, method="lowrank-uniform",
                            config=config, progress=False)
    assert manifest["compression"]["params_ratio"] >= 3.0
    assert manifest["metrics"]["n"] == 8
    model, _ = load_checkpoint(tmp_path / "small")
    assert any(isinstance(m, LowRankConv2d) for m in model.modules())
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)


if __name__ == "__main__":  # torchrun worker: python -m torch.distributed.run ... test_distributed.py OUT
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]))


@requires_cuda
def test_gpu_forward_matches_cpu_and_amp_pgd_stays_in_ball(digits: Any) -> None:
    """CUDA numerics: fp32 logits equal the CPU's (1e-4) and bf16/fp16 PGD keeps inside the eps-ball and [0,1]."""
    from cstar.attacks import pgd
    from cstar.lowrank import LowRankConv2d
    from cstar.models import build_model
    from cstar.train import autocast_context

    torch.manual_seed(0)
    model = build_model("small-resnet", digits.spec, width=8).eval()
    model.net.layer2[0].conv2 = LowRankConv2d(16, 16, (3, 3), (4, 4), padding=(1, 1))  # a factorized layer too
    x = torch.rand(32, *digits.spec.input_shape)
    y = torch.randint(0, digits.spec.num_classes, (32,))
    cpu_logits = model(x)
    gpu_model = model.cuda()
    gpu_logits = gpu_model(x.cuda()).cpu()
    assert torch.allclose(cpu_logits, gpu_logits, atol=1e-4, rtol=1e-4)
    with autocast_context(torch.device("cuda"), True):
        x_adv = pgd(gpu_model, x.cuda(), y.cuda(), 0.2, 5, 0.1, "linf", random_start=True)
    delta = (x_adv.float().cpu() - x).abs().max()
    assert float(delta) <= 0.2 + 1e-6 and float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
