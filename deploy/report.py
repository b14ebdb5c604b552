"""Verification reports: report.json (schema-checked), report.md and an optional report.png.

Device side: numpy-free even, standard library plus cstar.manifest; matplotlib and jsonschema are
optional and imported lazily (no plot / a small hand check when they are missing). Never torch.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.manifest import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    cpu_model,  # noqa: F401 - re-exported: deploy.report.cpu_model
    library_versions,
)
from deploy.markdown import md_table

REPORT_SCHEMA_VERSION = 1
DEVICE_VERSIONS = ("numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "openvino", "executorch")

_ACC = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_SIDE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["clean_acc", "agreement", "max_abs_diff", "transfer", "square", "worst_case_robust_acc"],
    "properties": {
        "clean_acc": _ACC,
        "agreement": _ACC,
        "max_abs_diff": {"type": ["number", "null"], "minimum": 0},
        "transfer": {"type": "object", "additionalProperties": _ACC},
        "square": {
            "type": ["object", "null"],
            "required": ["queries", "robust_acc"],
            "properties": {"queries": {"type": "integer", "minimum": 0}, "robust_acc": _ACC,
                           "n": {"type": "integer", "minimum": 0}, "mean_queries": {"type": ["number", "null"]}},
        },
        "worst_case_robust_acc": _ACC,
    },
}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cstar verify report.json",
    "type": "object",
    "required": ["schema_version", "backend", "artifact", "hardware", "versions", "thresholds", "passed",
                 "failed_checks", "metrics", "warnings"],
    "properties": {
        "schema_version": {"type": "integer", "minimum": 1},
        "backend": {"type": "string"},
        "artifact": {"type": "object", "required": ["path", "sha256"],
                     "properties": {"path": {"type": "string"}, "sha256": {"type": "string"}}},
        "hardware": {"type": "object"},
        "versions": {"type": "object", "required": ["python"], "additionalProperties": {"type": "string"}},
        "thresholds": {"type": "object", "additionalProperties": {"type": "number"}},
        "passed": {"type": "boolean"},
        "failed_checks": {"type": "array", "items": {"type": "string"}},
        "checks": {"type": "array", "items": {"type": "object", "required": ["name", "value", "threshold", "passed"]}},
        "metrics": {"type": "object", "required": ["reference", "runtime"],
                    "properties": {"reference": _SIDE_SCHEMA, "runtime": _SIDE_SCHEMA}},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "set": {"type": "object", "required": ["path", "sha256", "n"]},
        "eps": {"type": "number", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
    },
}


def hardware_info() -> dict[str, Any]:
    """Platform, CPU model, core count and machine type of this host."""
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(affinity(0)) if affinity else os.cpu_count(),
    }


def device_versions() -> dict[str, str]:
    """Versions of the device-side libraries (numpy, onnxruntime, tensorrt if present) and python."""
    return library_versions(DEVICE_VERSIONS)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats in [0,1] shown with 4 decimals, None as '-'."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            if value != 0 and abs(value) < 1e-3:
                return f"{value:.2e}"
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
        return str(value)

    return md_table([str(h) for h in headers], [[cell(v) for v in row] for row in rows]) + "\n"


# --------------------------------------------------------------------------------------- validation

def _type_ok(value: Any, expected: str | list[str]) -> bool:
    names = [expected] if isinstance(expected, str) else expected
    checks = {
        "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "null": lambda v: v is None,
    }
    return any(checks[name](value) for name in names)


def _hand_check(value: Any, schema: dict[str, Any], where: str) -> list[str]:
    """A small subset of JSON Schema (type, required, properties, items, additionalProperties, min/max)."""
    if "type" in schema and not _type_ok(value, schema["type"]):
        return [f"{where}: expected {schema['type']}, got {type(value).__name__}"]
    problems: list[str] = []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        problems += [f"{where}: missing '{key}'" for key in schema.get("required", []) if key not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                problems += _hand_check(item, sub, f"{where}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += _hand_check(item, schema["items"], f"{where}[{index}]")
    return problems


def validate_report(report: dict[str, Any]) -> None:
    """Raise CstarError when `report` does not match REPORT_SCHEMA (jsonschema if installed)."""
    try:
        import jsonschema
    except ImportError:
        problems = _hand_check(report, REPORT_SCHEMA, "report")
    else:
        validator = jsonschema.Draft202012Validator(REPORT_SCHEMA)
        problems = [f"report.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
                    for e in validator.iter_errors(report)]
    if problems:
        raise CstarError("report.json does not match its schema: " + "; ".join(problems[:5]),
                         "this is a bug in cstar verify; please report it")


# ------------------------------------------------------------------------------------------ writing

def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _attacks_run(side: dict[str, Any]) -> str:
    """'fgsm, pgd, square': the attacks behind a side's worst case."""
    names = [*sorted(side["transfer"]), *(["square"] if side.get("square") else [])]
    return ", ".join(names) or "no attack"


def _side_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """Rows reference vs runtime: clean, the worst case (headline), then each attack and the parity numbers."""
    ref, run = metrics["reference"], metrics["runtime"]
    rows: list[list[Any]] = [
        ["clean accuracy", _pct(ref["clean_acc"]), _pct(run["clean_acc"])],
        [f"worst-case robust (per example; reference: {_attacks_run(ref)}; runtime: {_attacks_run(run)})",
         _pct(ref["worst_case_robust_acc"]), _pct(run["worst_case_robust_acc"])],
    ]
    for attack in sorted(set(ref["transfer"]) | set(run["transfer"])):
        rows.append([f"robust ({attack}, transfer)", _pct(ref["transfer"].get(attack)), _pct(run["transfer"].get(attack))])
    ref_sq, run_sq = ref.get("square") or {}, run.get("square") or {}
    label = f"robust (square, {run_sq.get('queries', 0)} queries, n={run_sq.get('n', '-')})"
    rows.append([label, _pct(ref_sq.get("robust_acc")), _pct(run_sq.get("robust_acc"))])
    rows += [["agreement with reference", _pct(ref["agreement"]), _pct(run["agreement"])],
             ["max abs logit diff", ref["max_abs_diff"], run["max_abs_diff"]]]
    return rows


def verdict_line(report: dict[str, Any]) -> str:
    """The first line of report.md: gate result, what ran where, worst-case robust and clean accuracy."""
    run = report["metrics"]["runtime"]
    artifact = report["artifact"]
    name = Path(str(artifact.get("path", "?"))).name
    precision = f", {artifact['precision']}" if artifact.get("precision") else ""
    status = "PASSED" if report["passed"] else "FAILED (" + ", ".join(report["failed_checks"]) + ")"
    n = run.get("worst_case_n", run.get("n"))
    return (f"**{status}**: `{name}`{precision} on {report['backend']}: robust **{_pct(run['worst_case_robust_acc'])}** "
            f"(worst case over {_attacks_run(run)}{f'; n={n}' if n is not None else ''}), "
            f"clean {_pct(run['clean_acc'])}, agreement with the reference {_pct(run['agreement'])}")


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the verdict first, then metrics reference vs runtime, gate checks, warnings, environment."""
    parts = [
        f"# cstar verify: {report['backend']}\n",
        verdict_line(report) + "\n",
        f"- artifact: `{report['artifact']['path']}` (sha256 `{report['artifact']['sha256'][:12]}`)",
        f"- set: `{report.get('set', {}).get('path', '-')}` (n={report.get('set', {}).get('n', '-')}), "
        f"eps={report.get('eps', '-')}, norm={report.get('norm', '-')} (verify refuses a set whose eps/norm differ from "
        "the artifact's)\n",
        "## Accuracy and robustness\n",
        markdown_table(["metric", "reference (PyTorch)", f"runtime ({report['backend']})"], _side_rows(report["metrics"])),
        "## Gate checks\n",
        markdown_table(["check", "value", "threshold", "result"],
                       [[c["name"], c["value"], f"{c.get('op', '')} {c['threshold']}".strip(),
                         "pass" if c["passed"] else "FAIL"] for c in report.get("checks", [])]),
    ]
    if report["warnings"]:
        parts += ["## Warnings\n", "\n".join(f"- {w}" for w in report["warnings"]) + "\n"]
    hardware = report.get("hardware", {})
    versions = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
    parts += ["## Environment\n", f"- {hardware.get('processor', '?')} ({hardware.get('cpu_count', '?')} CPUs), "
              f"{hardware.get('platform', '?')}", f"- {versions}", f"- {report.get('seconds', 0):.1f} s\n"]
    return "\n".join(parts)


def _bars(metrics: dict[str, Any]) -> tuple[list[str], list[float | None], list[float | None]]:
    ref, run = metrics["reference"], metrics["runtime"]
    names = ["clean", "worst case", *[f"{a}\n(transfer)" for a in sorted(run["transfer"])], "square\n(black-box)"]
    values = []
    for side in (ref, run):
        square = (side.get("square") or {}).get("robust_acc")
        values.append([side["clean_acc"], side["worst_case_robust_acc"],
                       *[side["transfer"].get(a) for a in sorted(run["transfer"])], square])
    return names, values[0], values[1]


def plot_figure(report: dict[str, Any]) -> Any:
    """Bar chart reference vs runtime (clean, worst case, transfer attacks, square); legend below the axes."""
    import matplotlib.pyplot as plt

    names, ref, run = _bars(report["metrics"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.38
    for offset, values, label in ((-width / 2, ref, "reference (PyTorch)"), (width / 2, run, report["backend"])):
        xs = [i + offset for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"verify on {report['backend']} (eps={report.get('eps', '?')}); worst case = per example, every attack",
                 fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def write_plot(path: Path, report: dict[str, Any]) -> Path | None:
    """report.png (see plot_figure); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = plot_figure(report)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def write_report(out_dir: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Validate, then write report.png (optional), report.md and report.json (last) atomically."""
    validate_report(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_plot(out / "report.png", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    return atomic_write_json(out / "report.json", report)
