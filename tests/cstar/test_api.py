"""The Python API: in-memory compression, keyword options checked like the CLI's, results that print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cstar import api
from cstar.data import DatasetSpec
from cstar.errors import CstarError
from cstar.models import build_model

SPEC = DatasetSpec("synthetic", (3, 16, 16), tuple(str(i) for i in range(4)), (0.5,) * 3, (0.25,) * 3, 0.03)
ROOT = Path(__file__).resolve().parents[2]


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.rand(n, *SPEC.input_shape), torch.arange(n) % 4


def test_compress_model_in_memory_meets_the_budget_and_measures() -> None:
    torch.manual_seed(0)
    dense = build_model("small-resnet", SPEC, width=8).eval()
    images, labels = _data()
    result = api.compress_model(dense, DataLoader(TensorDataset(images, labels), batch_size=16), 3.0,
                                eps=0.03, admm_epochs=1, finetune_epochs=0, batch_size=16,
                                test_data=(images[:32], labels[:32]), eval_suite="pgd20")
    assert 3.0 <= result.ratios["params_ratio"] <= 3.0 * 1.25
    assert result.model is not dense and result.model(images[:2]).shape == (2, 4)
    assert result.metrics is not None and 0.0 <= result.metrics["robust_acc"] <= result.metrics["clean_acc"] <= 1.0
    assert result.metrics["n"] == 32 and any(entry["kind"] == "tucker2" for entry in result.ranks.values())
    assert str(result).startswith("cstar 3x by params: params 3.")


def test_unknown_options_and_data_are_clear_errors(tmp_path: Path) -> None:
    dense = build_model("small-resnet", SPEC, width=4)
    with pytest.raises(CstarError, match="unknown compress option.*admm_epoch") as caught:
        api.compress_model(dense, _data(), 2.0, admm_epoch=1)
    assert "admm_epochs" in caught.value.hint  # the valid names are listed
    with pytest.raises(CstarError, match="cannot use int as data"):
        api.compress_model(dense, 5, 2.0)
    with pytest.raises(CstarError, match="unknown option.*epoch_count"):
        api.train("digits", tmp_path / "t", epoch_count=3)
    assert not (tmp_path / "t").exists()


def test_stage_namespace_fills_defaults_and_needs_required() -> None:
    from cstar.train import add_arguments

    ns = api.stage_namespace(add_arguments, "train", data="digits", out=Path("x"), epochs=2)
    assert ns.epochs == 2 and ns.method == "pgd-at" and ns.out == Path("x")
    with pytest.raises(CstarError, match="train needs out"):
        api.stage_namespace(add_arguments, "train", data="digits")


def test_deploy_api_imports_without_torch() -> None:
    code = "import sys, deploy.api; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
