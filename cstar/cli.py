"""The `cstar` command: one subcommand per stage, each imported only when it runs.

Every stage module exposes `add_arguments(parser)` and `main(args) -> int`. Adding a stage is one
line in `COMMANDS`. `cstar --help` imports nothing heavy. This is the only module of `cstar` that
sees the other packages (export, calibration, deploy).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from cstar import __version__
from cstar.errors import CstarError, GateFailure

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("cstar.train", "adversarially train a dense model (PGD-AT or TRADES)"),
    "import": ("cstar.importer", "a train-stage directory from weights made elsewhere (.safetensors, .pt)"),
    "compress": ("cstar.compress", "compress a robust model: CSTAR, robust pruning or uniform low-rank"),
    "export": ("export.exporter", "deploy form -> ONNX, simplified and parity-checked"),
    "calibrate": ("calibration.calibrate", "INT8 explicit Q/DQ quantization with a calibration set"),
    "build": ("deploy.build", "ready-to-run backend directory (ONNX Runtime or TensorRT engine)"),
    "attackset": ("deploy.attackset", "craft the transfer attack set on the PyTorch reference (host side)"),
    "verify": ("deploy.verify", "re-check accuracy and robustness on the runtime (device side, torch-free)"),
    "bench": ("deploy.bench", "latency and throughput on the runtime (device side, torch-free)"),
    "profile": ("deploy.profile", "per-layer latency table of a model measured on the runtime (for --by latency)"),
    "predict": ("deploy.predict", "classify images or .npy arrays on the runtime (device side, torch-free)"),
    "pipeline": ("deploy.pipeline", "run every stage from one config and write report.md/html"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="cstar",
        description="Small, structured, adversarially robust CNNs, carried to edge runtimes with proof.",
        epilog=f"commands:\n{lines}\n\nrun 'cstar COMMAND --help' for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cstar {__version__}")
    parser.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    return parser


def build_command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """Import command `name`'s module and return (its parser, the module)."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"cstar {name}", description=help_text)
    module.add_arguments(parser)
    return parser, module


THREADS_ENV = "CSTAR_THREADS"

# import names that only `pip install 'cstar[train]'` brings (the base install is the device side)
TRAIN_ONLY_MODULES = frozenset({
    "torch", "torchvision", "sklearn", "tqdm", "matplotlib", "safetensors", "onnxscript", "onnxslim", "onnxsim",
    "sympy", "yaml",
})


def missing_train_dependency(exc: ImportError) -> CstarError | None:
    """The clear error for a host-side command run on the device-only install; None for other import errors."""
    root = (exc.name or "").split(".")[0]
    if root not in TRAIN_ONLY_MODULES:
        return None
    return CstarError(
        f"this command needs '{root}', which the device-only install (plain `pip install cstar`) does not bring",
        "pip install 'cstar[train]' (host stages: train, compress, export, calibrate, attackset, pipeline); "
        "verify, bench and predict run without it",
    )


def apply_thread_limit(environ: dict[str, str] | os._Environ[str] = os.environ) -> int | None:
    """torch.set_num_threads($CSTAR_THREADS) when set and torch is already loaded; returns the count.

    torch's default (one thread per core) oversubscribes a shared few-core host badly; this caps the
    torch stages without a flag on every command. Torch-free commands (verify, bench, predict) never
    import torch for it.
    """
    value = environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise CstarError(f"{THREADS_ENV}={value!r} is not a positive integer", f"set e.g. {THREADS_ENV}=2, or unset it")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(value))
    return int(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cstar` console script and `python -m cstar`."""
    args = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not args or args[0].startswith("-"):
        top.parse_args(args)
        top.print_help()
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n  fix: use one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        parser, module = build_command_parser(name)
        parsed = parser.parse_args(rest)
        apply_thread_limit()
        return int(module.main(parsed) or 0)  # type: ignore[attr-defined]
    except GateFailure as exc:
        print(f"FAILED: {exc.message}", file=sys.stderr)
        return 1
    except ImportError as exc:
        error = missing_train_dependency(exc)
        if error is None:
            raise
        print(f"error: {error.message}\n  fix: {error.hint}", file=sys.stderr)
        return 2
    except CstarError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  fix: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
