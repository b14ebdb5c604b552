"""What `cstar compress` takes besides its directories (`CompressConfig`, recorded in the manifest) and
the names its parser offers. Torch-free: the pipeline's config and the parsers read it without torch."""

from __future__ import annotations

from dataclasses import dataclass

from cstar import validate
from cstar.config import FACTOR_DECAYS
from cstar.errors import CstarError
from cstar.stage_metrics import EvalSpec

METHODS = ("cstar", "prune", "lowrank-uniform", "hybrid")  # the names of COMPRESSION_METHODS (a test checks they agree)
BUDGETS = ("params", "flops", "latency")  # cstar.ranks.BUDGETS; latency needs a `cstar profile` table


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


def eval_spec(cfg: CompressConfig) -> EvalSpec:
    """The attack suite of the test metrics, as the config names it."""
    return EvalSpec(cfg.eval_suite, cfg.eval_steps, cfg.eval_queries, seed=cfg.seed)
