"""The compression a model reached: params, FLOPs and predicted-latency ratios counted on the real models."""

from __future__ import annotations

from typing import Any

from cstar.compress.config import CompressConfig


def compression_ratios(dense: Any, compressed: Any, input_shape: tuple[int, ...], table: Any = None,
                       latency_batch: int | tuple[int, ...] = 1) -> dict[str, float]:
    """params and FLOPs (MACs) ratios dense / compressed, counted on the real models (and the predicted
    latency ratio when a latency table is given: the dense model's measured latency over the compressed one's
    predicted, the smallest over the budget's batch sizes, each layer in the form fastest at the first)."""
    from cstar.flops import count_flops, count_params

    ratios = {
        "params_ratio": count_params(dense) / count_params(compressed),
        "flops_ratio": count_flops(dense, input_shape) / count_flops(compressed, input_shape),
        "params": count_params(compressed),
        "flops": count_flops(compressed, input_shape),
        "dense_params": count_params(dense),
        "dense_flops": count_flops(dense, input_shape),
    }
    if table is not None:
        from cstar.latency import reference_latency_ms
        from cstar.latency_table import latency_batches

        batches = latency_batches(latency_batch)
        dense_ms, compressed_ms = ({b: reference_latency_ms(m, table, b, batches[0]) for b in batches}
                                   for m in (dense, compressed))
        ratios.update(latency_ratio=min(dense_ms[b] / compressed_ms[b] for b in batches),
                      latency_ms=compressed_ms[batches[0]], dense_latency_ms=dense_ms[batches[0]])
    return ratios


def check_ratio(ratios: dict[str, float], cfg: CompressConfig) -> None:
    achieved = ratios[f"{cfg.by}_ratio"]
    if achieved + 1e-9 < cfg.ratio:
        raise RuntimeError(f"internal error: achieved {cfg.by} ratio {achieved:.3f} < requested {cfg.ratio}")
