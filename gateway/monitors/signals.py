"""What makes one answered row suspicious, per monitor signal. Vectorised: a row costs microseconds.

``low_confidence`` reads the model's answer *before* hardening: a row whose best
score is under ``threshold`` is suspicious. Extraction attacks live there
(Knockoff-style random or mixed queries and Jacobian-augmented points sit near
decision boundaries, where the model is unsure), honest traffic mostly does not.
Scores that are not probabilities (a negative value, or a row not summing to
about 1: logits, log-probabilities) are put through a softmax first, so the
threshold always means a probability.

``out_of_distribution`` reads the request's input rows: a row farther
(Euclidean) than ``distance`` from every row of the reference set is
suspicious. The reference is a ``.npy`` file of in-distribution rows
``[rows, features]`` (float32 after loading; at most 100,000 rows, a few hundred
is the intended size), read with ``allow_pickle=False`` when the policy loads.
Distances use ``|x|^2 + |r|^2 - 2 x.r`` as one matrix product, in chunks of
rows so a 4,096-row request stays bounded in memory; 300 reference rows of 64
features cost a few microseconds per row. A row whose width differs from the
reference's is suspicious (it cannot be in distribution).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CHUNK_ROWS = 1024


SMALL = 256  # values: below this, plain Python beats numpy's fixed cost per call (~2 us vs ~20 us a row)


def low_confidence(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Suspicion per row of ``scores`` [n, classes]: the best probability is under ``threshold``."""
    if isinstance(scores, np.ndarray) and scores.ndim == 2 and 0 < scores.size <= SMALL:
        return np.array([_row_low(row, threshold) for row in scores.tolist()], dtype=bool)
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        return np.zeros(values.shape[0] if values.ndim else 0, dtype=bool)
    # huge finite scores overflow a row's sum (to inf: softmax then) or a shift (to -inf: exp 0), as in the
    # plain-Python rule below; numpy's warnings about it would only be noise on stderr (or errors under -W error)
    with np.errstate(over="ignore"):
        if values.min() < 0 or np.abs(values.sum(axis=1) - 1.0).max() > 1e-3:  # (np.allclose costs ~10x more)
            shifted = values - values.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            values = exp / exp.sum(axis=1, keepdims=True)
    return np.asarray(values.max(axis=1) < threshold)


def _row_low(row: list[float], threshold: float) -> bool:
    """One row of ``low_confidence``, in plain Python (the same rule: softmax unless probabilities)."""
    if min(row) < 0 or abs(sum(row) - 1.0) > 1e-3:
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        return 1.0 / sum(exps) < threshold  # the best class's softmax: exp(0) / sum
    return max(row) < threshold


class Reference:
    """Reference rows with their squared norms, ready for nearest-row distances."""

    __slots__ = ("rows", "norms", "features")

    def __init__(self, rows: Any) -> None:
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.norms = np.einsum("ij,ij->i", self.rows, self.rows)
        self.features = self.rows.shape[1]

    def nearest(self, inputs: np.ndarray) -> np.ndarray:
        """Distance from each row of ``inputs`` [n, features] to its nearest reference row.

        inf or NaN for a row whose values are too large for float32 arithmetic (a finite value past ~1e19
        overflows its square; past ~3e38 the cast itself): ``out_of_distribution`` counts those as far.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.asarray(inputs, dtype=np.float32)
            out = np.empty(x.shape[0], dtype=np.float32)
            for i in range(0, x.shape[0], CHUNK_ROWS):
                part = x[i:i + CHUNK_ROWS]
                d2 = np.einsum("ij,ij->i", part, part)[:, None] + self.norms[None, :] - 2.0 * (part @ self.rows.T)
                out[i:i + CHUNK_ROWS] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
        return out


def out_of_distribution(inputs: np.ndarray, reference: Reference, distance: float) -> np.ndarray:
    """Suspicion per input row: farther than ``distance`` from every reference row."""
    x = np.asarray(inputs)
    if x.ndim != 2:
        return np.ones(x.shape[0] if x.ndim else 1, dtype=bool)
    if x.shape[1] != reference.features:
        return np.ones(x.shape[0], dtype=bool)
    # not "> distance": a distance that is not a number (inf - inf, for an input too large to measure) compares
    # False with everything, and the most unnatural inputs there are would pass as in distribution
    return ~np.asarray(reference.nearest(x) <= distance)


def bits(flags: np.ndarray) -> str:
    """Suspicion flags as the window's wire form: "1" suspicious, "0" not, one character per row."""
    if len(flags) <= SMALL:
        return "".join(["1" if f else "0" for f in flags.tolist()])
    return (np.asarray(flags, dtype=bool).astype(np.uint8) + 48).tobytes().decode("ascii")
