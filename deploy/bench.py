"""`cstar bench`: latency and throughput of an artifact on a runtime (device side, torch-free).

Per batch size: warm-up iterations (excluded), then timed `infer` calls on random [0,1] inputs
(fixed seed); p50/p90/p99/mean/std in ms and images per second. Writes bench.json and bench.md.
`--compare DIR2` benchmarks a second artifact (e.g. the dense export) on the same runtime in
interleaved rounds (`--rounds`, the order alternating), so load drift hits both alike; the speedup
per batch is the median over rounds of that round's p50 ratio, reported next to the FLOPs ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError
from cstar.manifest import atomic_write_json, atomic_write_text
from deploy.report import device_versions, hardware_info, markdown_table
from deploy.verify import resolve_backend, runner_options

BENCH_SCHEMA_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar bench`."""
    parser.add_argument("--artifact", required=True, help="export, calibrate or build directory")
    parser.add_argument("--backend", default=None, help="runtime backend (default: the artifact's build backend or ort-cpu)")
    parser.add_argument("--batch-sizes", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per batch size (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up iterations (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="runtime intra-op threads (ONNX Runtime backends)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--compare", default=None,
                        help="a second artifact (e.g. dense) timed on the same runtime in interleaved rounds")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds with --compare (default 5; --iters is split over them)")
    parser.add_argument("--out", required=True, help="output directory (bench.json, bench.md)")


def main(args: argparse.Namespace) -> int:
    """CLI entry: run the benchmark and print the table."""
    result = run_bench(args.artifact, args.out, backend=args.backend, batch_sizes=parse_batch_sizes(args.batch_sizes),
                       iters=args.iters, warmup=args.warmup, threads=args.threads, seed=args.seed,
                       compare=args.compare, rounds=args.rounds)
    print(results_table(result))
    return 0


def parse_batch_sizes(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64] with clear errors."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise CstarError(f"--batch-sizes '{text}' is not a comma-separated list of integers", "e.g. --batch-sizes 1,8,64"
                         ) from exc
    if not sizes or any(s < 1 for s in sizes):
        raise CstarError(f"--batch-sizes '{text}' needs positive integers", "e.g. --batch-sizes 1,8,64")
    return sizes


def latency_stats(times_ms: np.ndarray, batch_size: int) -> dict[str, float]:
    """p50/p90/p99/mean/std (ms) and throughput (images/s at the mean latency)."""
    mean = float(times_ms.mean())
    return {
        "batch_size": batch_size,
        "iters": int(times_ms.size),
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "p99_ms": float(np.percentile(times_ms, 99)),
        "mean_ms": mean,
        "std_ms": float(times_ms.std()),
        "min_ms": float(times_ms.min()),
        "throughput": batch_size * 1000.0 / mean if mean > 0 else 0.0,
    }


def time_batch(runner: Any, batch: np.ndarray, iters: int, warmup: int) -> np.ndarray:
    """Wall-clock ms of `iters` runtime calls after `warmup` untimed ones.

    The batch is validated once, outside the loop, and the loop times the
    runtime call alone (`infer_impl`): Python-side validation would add a fixed cost per call that
    pulls every speedup toward 1x.
    """
    batch = runner.validate(batch)
    for _ in range(warmup):
        runner.infer_impl(batch)
    times = np.empty(iters, dtype=np.float64)
    for i in range(iters):
        start = time.perf_counter()
        runner.infer_impl(batch)
        times[i] = (time.perf_counter() - start) * 1000.0
    return times


def _check_batch(runner: Any, batch_size: int, where: str) -> None:
    low, high = runner.batch_range()
    if batch_size < low or (high is not None and batch_size > high):
        raise CstarError(f"batch size {batch_size} is outside what {where} accepts ({low}..{high or 'any'})",
                         "pick --batch-sizes within the built range, or rebuild with another --max-batch")


def _artifact_record(artifact: Any, backend: str, info: dict[str, Any], results: list[dict[str, Any]]
                     ) -> dict[str, Any]:
    manifest = artifact.manifest
    return {
        "backend": backend,
        "artifact": {"path": str(Path(artifact.directory).resolve()), "sha256": artifact.sha256,
                     "model": Path(artifact.model_path).name, "stage": artifact.stage, "precision": artifact.precision},
        "flops": manifest.get("flops"),
        "params": manifest.get("params"),
        "runtime_info": info,
        "results": results,
    }


def bench_artifact(artifact_dir: str | Path, backend: str | None, batch_sizes: list[int], iters: int, warmup: int,
                   threads: int | None, seed: int) -> dict[str, Any]:
    """Benchmark one artifact: {backend, artifact, flops, params, runtime_info, results}."""
    from deploy.artifact import load_artifact, open_runner

    artifact = load_artifact(artifact_dir)
    backend = resolve_backend(artifact, backend)
    rng = np.random.default_rng(seed)
    results = []
    with open_runner(artifact, backend, **runner_options(backend, threads)) as runner:
        for size in batch_sizes:
            _check_batch(runner, size, f"{artifact_dir} on {backend}")
            batch = rng.random((size, *artifact.input_shape), dtype=np.float32)
            results.append(latency_stats(time_batch(runner, batch, iters, warmup), size))
        info = runner.describe()
    return _artifact_record(artifact, backend, info, results)


def bench_interleaved(artifact_dirs: list[str | Path], backend: str | None, batch_sizes: list[int], iters: int,
                      warmup: int, threads: int | None, seed: int, rounds: int) -> list[dict[str, Any]]:
    """Benchmark several artifacts on one runtime in interleaved rounds (order alternating each round).

    Each record's results pool every round's timings; `rounds_p50_ms` keeps each round's p50 so that a
    ratio can be taken per round (same load for both sides) and then its median.
    """
    from contextlib import ExitStack

    from deploy.artifact import load_artifact, open_runner

    artifacts = [load_artifact(d) for d in artifact_dirs]
    backend = resolve_backend(artifacts[0], backend)
    per_round = max(1, iters // rounds)
    rng = np.random.default_rng(seed)
    batches = {(i, size): rng.random((size, *a.input_shape), dtype=np.float32)
               for i, a in enumerate(artifacts) for size in batch_sizes}
    times: dict[tuple[int, int], list[np.ndarray]] = {key: [] for key in batches}
    with ExitStack() as stack:
        runners = [stack.enter_context(open_runner(a, backend, **runner_options(backend, threads))) for a in artifacts]
        for i, runner in enumerate(runners):
            for size in batch_sizes:
                _check_batch(runner, size, f"{artifact_dirs[i]} on {backend}")
        for round_index in range(rounds):
            order = range(len(runners)) if round_index % 2 == 0 else reversed(range(len(runners)))
            for i in order:
                for size in batch_sizes:
                    times[(i, size)].append(time_batch(runners[i], batches[(i, size)], per_round,
                                                       warmup if round_index == 0 else min(warmup, 2)))
        infos = [runner.describe() for runner in runners]
    records = []
    for i, artifact in enumerate(artifacts):
        results = []
        for size in batch_sizes:
            row: dict[str, Any] = dict(latency_stats(np.concatenate(times[(i, size)]), size))
            row["rounds_p50_ms"] = [float(np.percentile(t, 50)) for t in times[(i, size)]]
            results.append(row)
        records.append(_artifact_record(artifact, backend, infos[i], results))
    return records


def environment(threads: int | None, runtime_info: dict[str, Any]) -> dict[str, Any]:
    """CPU model, cores, threads, provider and library versions of this host."""
    hardware = hardware_info()
    return {**hardware, "cpu_model": hardware["processor"], "threads": threads,
            "provider": runtime_info.get("provider") or runtime_info.get("providers") or runtime_info.get("backend"),
            "versions": device_versions()}


def compare_block(this: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Second artifact's results plus per-batch speedup = other p50 / this p50 and flops_ratio = other / this.

    With interleaved rounds (`rounds_p50_ms` on both sides) the speedup is the median of the per-round ratios.
    """
    others = {row["batch_size"]: row for row in other["results"]}
    speedup: dict[str, float | None] = {}
    for row in this["results"]:
        match = others.get(row["batch_size"])
        if match is None:
            continue
        if row.get("rounds_p50_ms") and match.get("rounds_p50_ms"):
            ratios = [o / t for o, t in zip(match["rounds_p50_ms"], row["rounds_p50_ms"], strict=True) if t > 0]
            speedup[str(row["batch_size"])] = float(np.median(ratios)) if ratios else None
        else:
            speedup[str(row["batch_size"])] = match["p50_ms"] / row["p50_ms"] if row["p50_ms"] > 0 else None
    flops_ratio = (other["flops"] / this["flops"]) if this.get("flops") and other.get("flops") else None
    params_ratio = (other["params"] / this["params"]) if this.get("params") and other.get("params") else None
    return {"artifact": other["artifact"], "backend": other["backend"], "flops": other["flops"],
            "params": other["params"], "results": other["results"], "speedup_p50": speedup,
            "flops_ratio": flops_ratio, "params_ratio": params_ratio,
            "interleaved_rounds": len(this["results"][0].get("rounds_p50_ms", [])) if this["results"] else 0}


def run_bench(
    artifact_dir: str | Path,
    out: str | Path,
    backend: str | None = None,
    batch_sizes: list[int] | None = None,
    iters: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    seed: int = 0,
    compare: str | Path | None = None,
    rounds: int = 5,
) -> dict[str, Any]:
    """Benchmark (and optionally compare, interleaved); write bench.json and bench.md atomically."""
    batch_sizes = batch_sizes or [1, 8, 64]
    if iters < 1 or warmup < 0:
        raise CstarError(f"--iters must be >= 1 and --warmup >= 0 (got {iters}, {warmup})", "e.g. --iters 50 --warmup 10")
    if rounds < 1:
        raise CstarError(f"--rounds must be >= 1 (got {rounds})", "e.g. --rounds 5")
    started = time.perf_counter()
    if compare is not None:
        main_result, other = bench_interleaved([artifact_dir, compare], backend, batch_sizes, iters, warmup, threads,
                                               seed, rounds)
    else:
        main_result = bench_artifact(artifact_dir, backend, batch_sizes, iters, warmup, threads, seed)
    result: dict[str, Any] = {
        "schema_version": BENCH_SCHEMA_VERSION,
        "backend": main_result["backend"],
        "artifact": main_result["artifact"],
        "environment": environment(threads, main_result["runtime_info"]),
        "settings": {"batch_sizes": batch_sizes, "iters": iters, "warmup": warmup, "seed": seed,
                     "rounds": rounds if compare is not None else 1},
        "results": main_result["results"],
        "flops": main_result["flops"],
        "params": main_result["params"],
        "runtime_info": main_result["runtime_info"],
    }
    if compare is not None:
        result["compare"] = compare_block(main_result, other)
    result["seconds"] = round(time.perf_counter() - started, 3)
    out_dir = Path(out)
    atomic_write_text(out_dir / "bench.md", bench_markdown(result))
    atomic_write_json(out_dir / "bench.json", result)
    return result


def results_table(result: dict[str, Any]) -> str:
    """Markdown table of the latency rows (plus compare columns when present)."""
    compare = result.get("compare")
    headers = ["batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "img/s"]
    if compare:
        headers += ["compare p50 ms", "speedup (p50)"]
        other = {row["batch_size"]: row for row in compare["results"]}
    rows = []
    for row in result["results"]:
        line: list[Any] = [row["batch_size"], row["p50_ms"], row["p90_ms"], row["p99_ms"], row["mean_ms"],
                           row["std_ms"], round(row["throughput"], 1)]
        if compare:
            line += [other.get(row["batch_size"], {}).get("p50_ms"), compare["speedup_p50"].get(str(row["batch_size"]))]
        rows.append(line)
    return markdown_table(headers, rows)


def bench_markdown(result: dict[str, Any]) -> str:
    """bench.md: the table, FLOPs/params, machine info."""
    env = result["environment"]
    parts = [f"# cstar bench: {result['backend']}\n",
             f"- artifact: `{result['artifact']['path']}` ({result['artifact'].get('precision', '?')})",
             f"- params: {result.get('params', '-')}, FLOPs (MACs, batch 1): {result.get('flops', '-')}\n",
             results_table(result)]
    compare = result.get("compare")
    if compare:
        parts.append(f"compared with `{compare['artifact']['path']}`: FLOPs ratio {compare['flops_ratio']}, "
                     f"params ratio {compare['params_ratio']}\n")
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    parts += ["## Machine\n", f"- CPU: {env.get('cpu_model')} ({env.get('cpu_count')} cores, "
              f"{env.get('cpus_available')} available), threads: {env.get('threads') or 'runtime default'}",
              f"- provider: {env.get('provider')}", f"- {env.get('platform')}", f"- {versions}\n"]
    return "\n".join(parts)
