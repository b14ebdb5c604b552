"""The resume state of `fit`: written atomically, read safely (weights_only), checked against the run's
configuration, with every RNG stream, so a killed run continues where it stopped."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cstar import distributed as dist
from cstar.errors import CstarError
from cstar.manifest import atomic_target
from cstar.train.config import RESUME_KEYS, FitResult, TrainConfig
from cstar.train.epoch import EpochProgress

STATE_NAME = "train_state.pt"
STATE_FORMAT = 2


def save_state(state_dir: Path, payload: dict[str, Any]) -> None:
    """Atomic write of the resume state (temp file, fsync, rename): a kill never leaves half a file."""
    tmp = atomic_target(state_dir / STATE_NAME)
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(state_dir / STATE_NAME)
    finally:
        tmp.unlink(missing_ok=True)


def read_state(path: Path) -> dict[str, Any]:
    """Load a resume state file; a truncated, foreign or incomplete one is a clear CstarError."""
    hint = f"delete {path} (or its run directory) and start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a half-written or foreign file must not be trusted
        raise CstarError(f"corrupt resume state {path} ({type(exc).__name__}: {str(exc)[:120]})", hint) from exc
    required = {"format", "config", "epoch", "step", "model", "optimizer", "scheduler", "rng", "history",
                "history_keys", "best_epoch", "partial", "world_size"}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not required <= set(state):
        raise CstarError(f"corrupt resume state {path} (not a cstar format-{STATE_FORMAT} training state)", hint)
    return state


def load_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_NAME
    return read_state(path) if path.is_file() else None


def resume_key(cfg: TrainConfig, n_train: int) -> str:
    """What must match between an interrupted and a resumed run (JSON, stored in the state)."""
    values = {k: getattr(cfg, k) for k in RESUME_KEYS}
    return json.dumps({**values, "train_images": n_train}, sort_keys=True)


def check_resumable(state: dict[str, Any], key: str, state_dir: Path) -> None:
    if state["config"] != key:
        saved, now = json.loads(state["config"]), json.loads(key)
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if saved.get(k) != now.get(k))
        raise CstarError(f"the resume state in {state_dir} was written by a different configuration ({diff})",
                         "resume with the same arguments as the interrupted run, or delete the directory")
    if int(state["step"]) > 0 and int(state["world_size"]) != dist.world_size():
        raise CstarError(
            f"the resume state in {state_dir} stopped mid-epoch with {int(state['world_size'])} processes, "
            f"this run has {dist.world_size()}", "resume with the same --nproc_per_node as the interrupted run")


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": float("nan") if py_state[2] is None else float(py_state[2]),
    }
    if device.type == "cuda":  # this rank's device; every rank draws the same amounts
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state.get("numpy_gauss", [0, 0.0])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state.get("numpy_pos", 624)),
                         int(has_gauss), float(gauss)))
    py_gauss = float(state.get("python_gauss", float("nan")))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None if math.isnan(py_gauss) else py_gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def state_payload(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                   device: torch.device, epoch: int, at: EpochProgress, result: FitResult,
                   best_state: dict[str, torch.Tensor] | None, key: str, steps_per_epoch: int) -> dict[str, Any]:
    """Everything `fit` needs to continue at (epoch, step): step 0 means the epoch has not started."""
    keys = sorted({k for row in result.history for k in row})
    history = torch.tensor([[row.get(k, float("nan")) for k in keys] for row in result.history], dtype=torch.float64)
    payload: dict[str, Any] = {
        "format": STATE_FORMAT,
        "config": key,
        "epoch": epoch,
        "step": at.step,
        "steps_per_epoch": steps_per_epoch,
        "world_size": dist.world_size(),
        "partial": torch.tensor([at.loss_sum, float(at.seen), at.seconds], dtype=torch.float64),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(device),
        "history": history,
        "history_keys": keys,
        "best_epoch": result.best_epoch,
    }
    if best_state is not None:
        payload["best_model"] = best_state
    return payload
