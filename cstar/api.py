"""The Python API of the host stages (torch): train, import, compress, and `compress_model` for an in-memory module.

Each function takes objects (an `nn.Module`, tensors, a Dataset or DataLoader) or stage directories and
returns a result object whose fields are the numbers the CLI prints (`str(result)` is that one line). They
write the same directories and manifests as the CLI, so the two mix. Options are the CLI's, spelled as
keyword arguments (`batch_size=128` for `--batch-size 128`); an unknown one is a CstarError listing the valid
ones. The whole chain (export, calibrate, build, verify, bench) is `deploy.api`, which re-exports these.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cstar.errors import CstarError

PathLike = str | Path


# ------------------------------------------------------------------------------------------ results


def percent(value: Any) -> str:
    """0.345 -> '34.5%'; None -> '-' (how every result object prints an accuracy)."""
    return "-" if value is None else f"{100 * float(value):.1f}%"


@dataclass(frozen=True)
class StageResult:
    """A finished stage directory: where it is, its manifest, and the metrics it recorded."""

    stage: str
    directory: Path
    manifest: dict[str, Any] = field(repr=False)

    def __fspath__(self) -> str:  # a result can be passed wherever a stage directory is expected
        return str(self.directory)

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics") or {})

    @property
    def clean_acc(self) -> float | None:
        return self.metrics.get("clean_acc")

    @property
    def robust_acc(self) -> float | None:
        """Per-example worst case over the stage's attack suite (the headline robust number)."""
        return self.metrics.get("robust_acc")

    def __str__(self) -> str:
        text = f"{self.stage} {self.directory}: clean {percent(self.clean_acc)}, robust {percent(self.robust_acc)}"
        suite = (self.metrics.get("attack") or {}).get("suite")
        text += f" ({suite} suite)" if suite else ""
        ratios = self.manifest.get("compression") or {}
        if "params_ratio" in ratios:
            text += f", params {ratios['params_ratio']:.2f}x, MACs {ratios['flops_ratio']:.2f}x"
            if ratios.get("latency_ratio"):
                text += f", predicted latency {ratios['latency_ratio']:.2f}x"
        parity = self.manifest.get("parity") or {}
        if "max_abs_diff" in parity:
            text += f", parity max |diff| {parity['max_abs_diff']:.1e}"
        return text


@dataclass(frozen=True)
class CompressResult:
    """An in-memory compression (`compress_model`): the model and what was measured on it."""

    model: Any
    method: str
    by: str
    target: float
    ratios: dict[str, float]
    ranks: dict[str, Any] = field(repr=False)
    metrics: dict[str, Any] | None = None

    def __str__(self) -> str:
        text = (f"{self.method} {self.target:g}x by {self.by}: params {self.ratios['params_ratio']:.2f}x, "
                f"MACs {self.ratios['flops_ratio']:.2f}x")
        if "latency_ratio" in self.ratios:
            text += f", predicted latency {self.ratios['latency_ratio']:.2f}x"
        if self.metrics:
            text += f"; clean {percent(self.metrics.get('clean_acc'))}, robust {percent(self.metrics.get('robust_acc'))}"
        return text


# ------------------------------------------------------------------------------------------ options


def stage_namespace(add_arguments: Callable[[argparse.ArgumentParser], None], command: str,
                    **values: Any) -> argparse.Namespace:
    """The Namespace the CLI command would parse: its defaults, then `values` (keyword spelling of the options).
    Unknown keys and missing required options are CstarErrors naming the valid ones."""
    parser = argparse.ArgumentParser(prog=f"cstar {command}", add_help=False)
    add_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise CstarError(f"unknown option(s) {unknown} for {command}",
                         f"valid: {', '.join(sorted(actions))}")
    missing = [dest for dest, a in actions.items() if a.required and values.get(dest) is None]
    if missing:
        raise CstarError(f"{command} needs {', '.join(missing)}", f"pass {', '.join(f'{m}=...' for m in missing)}")
    namespace = argparse.Namespace(**{dest: a.default for dest, a in actions.items()})
    for key, value in values.items():
        kind = actions[key].type
        if isinstance(value, Path | StageResult) or (kind is Path and value is not None):
            value = Path(value)
        setattr(namespace, key, value)
    return namespace


def stage_dir(value: PathLike | StageResult) -> Path:
    """The directory of a path or a StageResult."""
    return Path(value)


def read_stage(stage: str, directory: Path) -> StageResult:
    """The StageResult of a finished stage directory (its manifest verified)."""
    from cstar.manifest import read_manifest

    manifest = read_manifest(directory)
    return StageResult(str(manifest.get("stage", stage)), directory, manifest)


# ------------------------------------------------------------------------------------------ host stages


def train(data: str, out: PathLike, **options: Any) -> StageResult:
    """`cstar train --data DATA --out OUT [options]`: adversarial training from scratch. `model` may be a
    registry name or `package.module:factory` (with `model_options` a JSON string or dict)."""
    import json

    from cstar.train import add_arguments, run_train

    if isinstance(options.get("model_options"), dict):
        options["model_options"] = json.dumps(options["model_options"])
    run_train(stage_namespace(add_arguments, "train", data=data, out=Path(out), **options))
    return read_stage("train", Path(out))


def import_weights(model: str, weights: PathLike, data: str, out: PathLike, **options: Any) -> StageResult:
    """`cstar import`: a train-stage directory from a checkpoint made elsewhere, measured on `data`."""
    from cstar.importer import run_import

    run_import(model, weights, data, out, **options)
    return read_stage("train", Path(out))


def compress(source: PathLike | StageResult, out: PathLike, ratio: float, **config: Any) -> StageResult:
    """`cstar compress --from SOURCE --out OUT --ratio R`: CompressConfig keys as keyword arguments
    (by, method, latency_table, admm_epochs, finetune_epochs, train_method, eval_suite, ...)."""
    from cstar.compress import run_compress

    if "latency_table" in config and config["latency_table"] is not None:
        config["latency_table"] = str(config["latency_table"])
    progress = bool(config.pop("progress", False))
    run_compress(stage_dir(source), out, ratio=ratio, config=config, progress=progress)
    return read_stage("compress", Path(out))


# ------------------------------------------------------------------------------------------ in memory


def compress_model(model: Any, data: Any, ratio: float, *, by: str = "params", method: str = "cstar",
                   eps: float = 8 / 255, norm: str = "linf", latency_table: PathLike | Any = None,
                   test_data: Any = None, input_shape: tuple[int, ...] | None = None, progress: bool = False,
                   **config: Any) -> CompressResult:
    """Compress an in-memory `model` (an nn.Module taking [0,1] pixels) with the compress stage's methods.

    `data`: the training data for ADMM and fine-tuning: a Dataset of (image, label), a DataLoader (its
    dataset), an (images, labels) pair of tensors, or a dataset name. `test_data` (same forms): measured with the
    stage's suite when given. `latency_table`: a `cstar profile` table (path or LatencyTable) for by='latency'.
    Other keyword arguments are CompressConfig fields (admm_epochs, finetune_epochs, train_method, ...)."""
    from cstar.compress import CompressConfig, compress_module, compression_ratios, eval_spec
    from cstar.stage_metrics import stage_metrics

    cfg = CompressConfig(ratio=ratio, by=by, method=method, **_config_keys(config))
    table = _table(latency_table)
    train_set = as_dataset(data, "train")
    shape = tuple(input_shape or train_set[0][0].shape)
    compressed, details = compress_module(model, train_set, shape, cfg, eps, norm, table, progress)
    device = next(compressed.parameters()).device  # compress_module resolved the config's device
    compressed, model = compressed.eval(), model.to(device)
    ratios = compression_ratios(model, compressed, shape, table, cfg.latency_batches)
    metrics = None
    if test_data is not None:
        images, labels = _tensors(as_dataset(test_data, "test"), cfg.eval_limit)
        metrics = stage_metrics(compressed, images.to(device), labels.to(device), eps, norm, eval_spec(cfg))
    return CompressResult(compressed, method, by, ratio, ratios, details["ranks"], metrics)


def _config_keys(config: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    from cstar.compress import CompressConfig

    valid = {f.name for f in dataclasses.fields(CompressConfig)}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise CstarError(f"unknown compress option(s) {unknown}", f"valid: {', '.join(sorted(valid))}")
    return config


def _table(table: PathLike | Any) -> Any:
    if table is None or not isinstance(table, str | Path):
        return table
    from cstar.latency_table import LatencyTable

    return LatencyTable.load(table)


def as_dataset(data: Any, split: str = "train") -> Any:
    """A Dataset of ([0,1] image tensor, int label) from a Dataset, DataLoader, (images, labels) or a name."""
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if isinstance(data, str):
        from cstar.data import load_dataset

        bundle = load_dataset(data)
        return bundle.train if split == "train" else bundle.test
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple | list) and len(data) == 2:
        images = torch.as_tensor(data[0], dtype=torch.float32)
        labels = torch.as_tensor(data[1], dtype=torch.long)
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise CstarError(f"(images, labels) must be (N, C, H, W) and (N,), got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}", "pass [0,1] float images NCHW and integer labels")
        return TensorDataset(images, labels)
    raise CstarError(f"cannot use {type(data).__name__} as data",
                     "pass a Dataset, a DataLoader, an (images, labels) pair of tensors or a dataset name")


def _tensors(dataset: Any, limit: int | None) -> tuple[Any, Any]:
    from cstar.data import to_tensors

    return to_tensors(dataset, limit=limit)
