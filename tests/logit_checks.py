"""Logit comparisons that hold on any x86 CPU and thread count, yet fail when an export or quantization breaks.

Runtimes round differently on different CPUs (AVX-512 VNNI or not, Intel or AMD, oneDNN/MLAS kernel
choice, thread count). Every model has near-tied examples whose top-1 flips under any such change,
so top-1 agreement and accuracy deltas are noisy figures, worst for a near-random model. What a
correct runtime does bound is the logit error; top-1 can only change on an example whose reference
margin (top-1 minus runner-up logit) is below twice the largest error. These helpers assert that.

FP32 vs FP32 (export parity): an absolute logit tolerance. INT8 vs FP32: the error relative to the
spread (standard deviation) of the reference logits, so the bound holds for a well-trained model
with logits of ~10 and for a near-random one with logits of ~0.5 alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def top1_margin(logits: np.ndarray) -> np.ndarray:
    """Per example: the top-1 logit minus the runner-up logit (>= 0)."""
    ordered = np.sort(np.asarray(logits, dtype=np.float64), axis=1)
    return ordered[:, -1] - ordered[:, -2]


def assert_fp32_parity(reference: np.ndarray, candidate: np.ndarray, atol: float) -> None:
    """max |candidate - reference| <= atol, and the same top-1 wherever the reference margin exceeds 2 atol."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    assert reference.shape == candidate.shape, (reference.shape, candidate.shape)
    worst = float(np.abs(candidate - reference).max())
    assert worst <= atol, f"max |logit difference| {worst:.3g} > {atol:.3g}"
    decided = top1_margin(reference) > 2 * atol
    flipped = np.flatnonzero(decided & (reference.argmax(1) != candidate.argmax(1)))
    assert flipped.size == 0, f"top-1 changed on examples {flipped.tolist()} with margins > {2 * atol:.3g}"


@dataclass
class Int8Error:
    """How far INT8 logits are from the FP32 (or PyTorch) reference, relative to the logits' spread."""

    spread: float  # standard deviation of every reference logit
    rel_rms: float  # RMS(candidate - reference) / spread
    rel_max: float  # max |candidate - reference| / spread
    confident: np.ndarray  # per example: reference top-1 margin > confident_margin * spread
    flipped: np.ndarray  # per example: top-1 differs

    @property
    def agreement(self) -> float:
        return float(1.0 - self.flipped.mean())


def int8_error(reference: np.ndarray, candidate: np.ndarray, confident_margin: float) -> Int8Error:
    """The relative error of `candidate` (INT8) against `reference`, and which examples are confident."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    assert reference.shape == candidate.shape, (reference.shape, candidate.shape)
    spread = float(reference.std())
    assert spread > 0, "the reference logits are constant: the model is broken"
    diff = candidate - reference
    return Int8Error(spread=spread, rel_rms=float(np.sqrt(np.mean(diff**2))) / spread,
                     rel_max=float(np.abs(diff).max()) / spread,
                     confident=top1_margin(reference) > confident_margin * spread,
                     flipped=reference.argmax(1) != candidate.argmax(1))


def assert_int8_tracks_fp32(reference: np.ndarray, candidate: np.ndarray, max_rel_rms: float,
                            confident_margin: float, min_confident: float = 0.1) -> Int8Error:
    """INT8 logits stay within `max_rel_rms` (RMS error / logit spread) of the reference, and keep the
    reference top-1 on every example whose margin exceeds `confident_margin` x spread.

    The second check is a tail bound (a flip there needs a logit error of half that margin, many times
    the RMS), not implied by the first; `min_confident` keeps it from being vacuous.
    """
    error = int8_error(reference, candidate, confident_margin)
    assert error.rel_rms <= max_rel_rms, (
        f"INT8 RMS logit error {error.rel_rms:.4f} x spread > {max_rel_rms} (max {error.rel_max:.3f} x spread,"
        f"spread {error.spread:.4g}): the quantization is broken")
    assert error.confident.mean() >= min_confident, (
        f"only {int(error.confident.sum())} of {error.confident.size} examples have a top-1 margin above "
        f"{confident_margin} x spread: the agreement check would be vacuous")
    flipped = np.flatnonzero(error.confident & error.flipped)
    assert flipped.size == 0, (
        f"INT8 changed the top-1 of examples {flipped.tolist()} whose FP32 margin exceeds {confident_margin} "
        f"x spread ({int(error.confident.sum())} such examples)")
    return error
