"""A client's model update as user-level DP sees it, and the sum of a cohort node's updates.

Under user-level DP the server releases Σ clip_C(stateᵢ − global) plus noise, so a cohort node
(``fedrec.federation.cohort``) may send that sum once instead of one model-sized reply per
client: the server then reads one array set per node, not per client. The node applies exactly
the clip the server applies to a client's own reply (``clipped_difference``, shared by both),
in float64 against the global arrays as sent, so the sum is what the server would have added
up (tested against one node per client).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A reply's metric under user-level DP: 1 if the client's update was within the clipping norm
# before it clipped it (adaptive clipping's count), else 0.
NORM_BIT = "norm-bit"


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of ``arrays`` taken together, as float64."""
    return math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in arrays))


def clipped_difference(
    values: Sequence[np.ndarray], reference: Sequence[np.ndarray], clipping_norm: float
) -> tuple[list[np.ndarray], float]:
    """(``values − reference`` in float64, scaled to L2 norm at most ``clipping_norm``; the
    norm before scaling). A zero update stays zero (Flower's clip would divide by it)."""
    update = [np.subtract(v, r, dtype=np.float64) for v, r in zip(values, reference, strict=True)]
    norm = l2_norm(update)
    if norm > clipping_norm:
        scale = clipping_norm / norm
        for u in update:
            u *= scale
    return update, norm


class NodeSum:
    """The running sum of clipped updates of a node's clients, and how many were added."""

    def __init__(self, reference: Sequence[np.ndarray], clipping_norm: float):
        self.reference = list(reference)
        self.clipping_norm = clipping_norm
        self.total = [np.zeros(r.shape, dtype=np.float64) for r in self.reference]
        self.count = 0

    def add(self, values: Sequence[np.ndarray]) -> None:
        update, _ = clipped_difference(values, self.reference, self.clipping_norm)
        for acc, u in zip(self.total, update, strict=True):
            acc += u
        self.count += 1
