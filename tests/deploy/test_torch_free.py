"""verify, predict and bench run where only the base (device) dependencies import: the device-side promise.

Every module of the `train` extra (torch, torchvision, sklearn, tqdm, matplotlib, ...) is blocked, which is
what `pip install cstar` without extras gives an edge box.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tomllib

from cstar.manifest import sha256_file, write_manifest
from tests.deploy.test_backends import make_export_dir, tiny_reference

REPO = Path(__file__).resolve().parents[2]
EPS = 0.1


# pip name -> module name where they differ
_MODULE_NAMES = {"scikit-learn": "sklearn", "pyyaml": "yaml", "pillow": "PIL"}


def _requirement_name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def train_only_modules() -> list[str]:
    """Import names of the `train` extra's packages that the base install does not bring."""
    project = pyproject()["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    train = [_requirement_name(r) for r in project["optional-dependencies"]["train"]]
    return sorted(_MODULE_NAMES.get(name, name).replace("-", "_") for name in train if name not in base)


def _blocker(tmp_path: Path, modules: list[str]) -> Path:
    """A directory whose packages `modules` raise ImportError; first on PYTHONPATH it hides the real ones."""
    root = tmp_path / "blocker"
    for module in modules:
        package = root / module
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {module!r} (blocked: not a device dependency)", '
            f'name={module!r})\n')
    return root


def _attack_set(directory: Path, n: int = 30) -> Path:
    """A hand-made attackset for the tiny export model (labels = its own predictions)."""
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, 8, 8), dtype=np.float32)
    labels = tiny_reference(x).argmax(axis=1).astype(np.int64)
    adv = {name: np.clip(x + rng.choice([-EPS, EPS], size=x.shape) * scale, 0, 1).astype(np.float32)
           for name, scale in (("pgd", 1.0), ("fgsm", 0.5))}
    arrays = {"x_clean": x, "labels": labels, "indices": np.arange(n), "ref_logits_clean": tiny_reference(x)}
    for name, values in adv.items():
        arrays[f"adv_{name}"] = values
        arrays[f"ref_logits_{name}"] = tiny_reference(values)
    directory.mkdir(parents=True)
    np.savez_compressed(directory / "attackset.npz", **arrays)
    classes = [f"class{i}" for i in range(3)]
    write_manifest(directory, "attackset", {
        "dataset": {"name": "tiny", "input_shape": [1, 8, 8], "classes": classes}, "eps": EPS, "norm": "linf",
        "classes": classes, "input": {"shape": [1, 8, 8]},
        "set": {"file": "attackset.npz", "sha256": sha256_file(directory / "attackset.npz"), "n": n,
                "attacks": {"pgd": {"name": "pgd", "eps": EPS}, "fgsm": {"name": "fgsm", "eps": EPS}}},
    })
    return directory


def run_cli_without_torch(commands: list[list[str]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `cstar` subcommands in a fresh Python where no `train`-extra module imports; fails if one got imported.

    Prints 'CODES [..]' with the exit code of each command.
    """
    blocked = train_only_modules()
    script = (
        "import json, sys\n"
        "from cstar.cli import main\n"
        f"codes = [main(argv) for argv in {commands!r}]\n"
        f"leaked = sorted(m for m in {blocked!r} if m in sys.modules)\n"
        "assert not leaked, f'train-only modules were imported: {leaked}'\n"
        "print('CODES', json.dumps(codes))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_blocker(tmp_path, blocked)), str(REPO)]),
           "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_verify_predict_bench_without_torch(tmp_path: Path) -> None:
    from PIL import Image

    export = make_export_dir(tmp_path / "export")
    attack_set = _attack_set(tmp_path / "set")
    pixels = (np.random.default_rng(1).random((8, 8)) * 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "image.png")
    np.save(tmp_path / "images.npy", np.random.default_rng(2).random((2, 1, 8, 8), dtype=np.float32))
    commands = [
        ["verify", "--artifact", str(export), "--backend", "ort-cpu", "--set", str(attack_set), "--square-queries",
         "20", "--max-robust-drop", "100", "--threads", "1", "--out", str(tmp_path / "report")],
        ["predict", "--artifact", str(export), "--json", "--top-k", "2", str(tmp_path / "image.png"),
         str(tmp_path / "images.npy")],
        ["bench", "--artifact", str(export), "--batch-sizes", "1,4", "--iters", "3", "--warmup", "1",
         "--out", str(tmp_path / "bench")],
    ]
    proc = run_cli_without_torch(commands, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CODES [0, 0, 0]" in proc.stdout, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] and report["metrics"]["runtime"]["agreement"] == 1.0
    assert report["metrics"]["runtime"]["square"]["n"] == 30
    assert report["set"]["n"] == 30 and report["eps"] == EPS
    start = proc.stdout.rindex("[", 0, proc.stdout.index('"file"'))
    predictions, _ = json.JSONDecoder().raw_decode(proc.stdout, start)
    assert [p["index"] for p in predictions] == [None, 0, 1]
    expected = tiny_reference(pixels[None, None].astype(np.float32) / 255).argmax()
    assert predictions[0]["top"][0]["class"] == f"class{expected}"
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [r["batch_size"] for r in bench["results"]] == [1, 4] and all(r["p50_ms"] > 0 for r in bench["results"])


def test_base_install_is_the_device_side() -> None:
    """`pip install cstar` brings numpy + onnx + onnxruntime (+ Pillow for images), never torch."""
    project = pyproject()["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    assert base == {"numpy", "onnx", "onnxruntime", "pillow"}
    blocked = train_only_modules()
    assert {"torch", "torchvision", "sklearn", "matplotlib", "tqdm", "safetensors", "yaml"} <= set(blocked)
    assert "train" in project["optional-dependencies"] and "torch==2.14.1" in project["optional-dependencies"]["train"]
    makefile = (REPO / "Makefile").read_text()
    assert '".[train,dev]"' in makefile, "make demo / make test must install the train extra"


def test_host_command_on_device_install_names_the_extra(tmp_path: Path) -> None:
    """`cstar train` where torch is absent: exit 2 with error/fix naming cstar[train], no traceback."""
    proc = run_cli_without_torch([["train", "--data", "digits", "--out", str(tmp_path / "t")]], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CODES [2]" in proc.stdout
    assert "error: this command needs 'torch'" in proc.stderr and "pip install 'cstar[train]'" in proc.stderr
    assert "Traceback" not in proc.stderr
