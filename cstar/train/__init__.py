"""Adversarial training (PGD-AT, TRADES, FGSM-RS, N-FGSM) with best-robust checkpoint selection and resume.

`fit` is the one training loop of the project: `cstar train` uses it for dense models and
`cstar compress` reuses it for the ADMM W-step (`extra_loss` adds the penalty, `on_epoch_end`
runs the Z/U updates) and for adversarial fine-tuning. It runs on CPU, on one GPU (AMP,
channels_last) and under `torchrun` (DistributedDataParallel; see cstar/distributed.py).

Crash safety: with a `state_dir`, the full training state is written atomically after every epoch
and every `checkpoint_every` optimizer steps (rank 0 only). The sample order of an epoch is a pure
function of (seed, epoch), so a run killed mid-epoch resumes at the next batch and ends where an
uninterrupted run ends (bit-exact on CPU with a fixed thread count and `workers 0`).

The package, one concept per module: `config` (the recipe), `runtime` (device, seeds, AMP),
`holdout` (the validation split), `optim` (optimizer, schedule, decay), `losses`, `epoch` (one epoch,
evaluation), `resume` (the state file), `loop` (`fit`) and `stage` (the `cstar train` command).
"""

from cstar.train.config import (
    DEFAULT_EPOCHS,
    FACTOR_DECAYS,
    METHODS,
    RESUME_KEYS,
    SCHEDULES,
    FitResult,
    TrainConfig,
)
from cstar.train.epoch import EpochProgress, evaluate, progress_bars, train_epoch
from cstar.train.holdout import split_train_val
from cstar.train.loop import fit
from cstar.train.losses import Teacher, adversarial_loss
from cstar.train.optim import factorized_layers, frobenius_penalty, make_optimizer, make_scheduler
from cstar.train.resume import STATE_FORMAT, STATE_NAME, read_state
from cstar.train.runtime import (
    amp_dtype,
    autocast_context,
    isolated_rng,
    make_scaler,
    resolve_device,
    seed_everything,
)
from cstar.train.stage import add_arguments, check_run_dir, claim_run_dir, main, run_train

__all__ = [
    "DEFAULT_EPOCHS", "FACTOR_DECAYS", "METHODS", "RESUME_KEYS", "SCHEDULES", "STATE_FORMAT", "STATE_NAME",
    "EpochProgress", "FitResult", "Teacher", "TrainConfig", "adversarial_loss", "add_arguments", "amp_dtype",
    "autocast_context", "check_run_dir", "claim_run_dir", "evaluate", "factorized_layers", "fit",
    "frobenius_penalty", "isolated_rng", "main", "make_optimizer", "make_scaler", "make_scheduler",
    "progress_bars", "read_state", "resolve_device", "run_train", "seed_everything", "split_train_val",
    "train_epoch",
]
