"""`cstar compress`: a robust dense checkpoint -> a factorized (CSTAR, uniform low-rank) or pruned robust model.

    cstar compress --from DENSE_DIR --ratio 8 [--by params|flops] [--method cstar|prune|lowrank-uniform|hybrid] --out DIR
    cstar compress --from DENSE_DIR --ratio 4 --by latency --latency-table TABLE [--latency-batch 1] --out DIR

Every method gets the same adversarial training recipe and epoch budget (ADMM epochs + fine-tune
epochs for CSTAR; the baselines fine-tune for the sum), so their comparison is fair. The output is
a compress-stage checkpoint (cstar.checkpoint.save_checkpoint) whose manifest records the source,
the threat model, test metrics (PGD-20), the compression ratios counted on the saved model and the
per-layer rank map. See docs/method.md for the method.

Same budget for every method: the layers CSTAR keeps dense (stem conv and classifier, unless
`--compress-ends`) keep their weights in every method; for pruning that leaves whole the channel groups
those layers produce or consume (cstar.baselines). The manifest's `dense_layers` records what each
method left dense. `hybrid` (cstar.hybrid) prunes to a share of the budget, then runs CSTAR on the rest.

Scale-out: under `torchrun --nproc_per_node N -m cstar compress ...` the ADMM W-steps and the
fine-tuning are DDP training over DistributedSampler shards (per-rank batch `batch_size`), the rank
allocation and Z/U are broadcast from rank 0, test metrics are sharded and summed, and rank 0
alone writes the output directory. `--amp`, `--channels-last` and `--workers` act as in `cstar train`.

The package, one concept per module: `config` (CompressConfig), `methods` (the registry), `trainer` (the
shared recipe), `engine` (one compression of an in-memory model), `structure` (structure-only compression), `ratios`, `stage` (`run_compress`) and
`command` (the CLI). Importing it needs no torch.
"""

from cstar.compress.command import add_arguments, main
from cstar.compress.config import BUDGETS, METHODS, CompressConfig, eval_spec
from cstar.compress.engine import compress_module, compress_with_method, inherit_recipe
from cstar.compress.methods import COMPRESSION_METHODS, MethodFn, MethodResult, compression_method
from cstar.compress.ratios import compression_ratios
from cstar.compress.stage import run_compress
from cstar.compress.structure import STRUCTURES, Structure, compress_structure
from cstar.compress.trainer import Trainer
from cstar.config import FACTOR_DECAYS

__all__ = [
    "BUDGETS", "COMPRESSION_METHODS", "FACTOR_DECAYS", "METHODS", "CompressConfig", "MethodFn", "MethodResult",
    "STRUCTURES", "Structure", "Trainer", "add_arguments", "compress_module", "compress_with_method", "compression_method",
    "compress_structure", "compression_ratios", "eval_spec", "inherit_recipe", "main", "run_compress",
]
