"""The numbers of a SecAgg+ round that both ends derive from the config: each client's share of
the DP noise, the quantisation range, and the share graph (``server.secagg`` sets the round's
protocol from them; ``clients.secagg`` checks what the server announces against them).
"""

from __future__ import annotations

import math

from fedrec.federation.config import FederatedConfig

PARTICIPATION = "query.participation"  # asked before SecAgg+: does the client take part?
MASKED = "secagg-masked"  # a reply metric the server adds: this client's update is in the sum
ARRAY_KEYS = "array-keys"  # the global model's array names, which Flower's legacy format loses
MODULUS_RANGE = 2**32  # Flower's masks live in [0, 2³²)
MAX_QUANTIZATION_RANGE = 2**24  # finer steps buy nothing: float32 updates carry 24 bits
MIN_QUANTIZATION_RANGE = 2**16
NOISE_TAIL = 8.0  # standard deviations of a noise share kept inside the quantisation range


def noise_share_std(fed: FederatedConfig) -> float:
    """The std of the Gaussian each client adds to its clipped update: σC/√m under distributed
    noise (m = ``min_contributors``: the m or more shares in an unmasked sum add up to at
    least DP-FedAvg's N(0, (σC)²)), 0 when the server adds the noise after unmasking."""
    central, secure = fed.central_dp, fed.secure_aggregation
    assert central is not None and secure is not None
    if secure.noise != "distributed":
        return 0.0
    return central.noise_multiplier * central.clipping_norm / math.sqrt(fed.secure_min_contributors)


def clipping_range(fed: FederatedConfig) -> float:
    """Every coordinate a client masks is clipped to [-R, R]: an update clipped to L2 norm C
    has no coordinate beyond C, and its noise share stays inside ``NOISE_TAIL`` stds
    (exceeded with probability < 10⁻¹⁴ per coordinate)."""
    central = fed.central_dp
    assert central is not None
    return central.clipping_norm + NOISE_TAIL * noise_share_std(fed)


def quantization_range(cohort: int) -> int:
    """Integer levels per coordinate for a round of ``cohort`` masked updates: the largest
    power of two whose sum over the cohort (and the weights Flower sums beside it) cannot wrap
    around the modulus, at most 2²⁴."""
    if cohort < 1:
        raise ValueError("a SecAgg+ round needs at least one client")
    levels = 2 ** int(math.log2(MODULUS_RANGE // (cohort + 1)))
    if levels < MIN_QUANTIZATION_RANGE:
        raise ValueError(
            f"a SecAgg+ cohort of {cohort} clients leaves fewer than 2¹⁶ quantisation levels "
            f"in Flower's 2³² modulus: sample at most {MODULUS_RANGE // MIN_QUANTIZATION_RANGE - 1}"
            " clients per round"
        )
    return min(levels, MAX_QUANTIZATION_RANGE)


def share_graph(fed: FederatedConfig, joined: int) -> tuple[int, int]:
    """(neighbours each client shares its secrets with, shares that rebuild one) for a round
    of ``joined`` clients: ``num_shares`` (a fraction of the round, or a count) capped at the
    round and kept odd below it (Flower fails on an even count), and a threshold of more than
    half of that, so the server can never rebuild both secrets of one client."""
    secure = fed.secure_aggregation
    assert secure is not None
    shares = secure.num_shares
    count = round(shares * joined) if isinstance(shares, float) else shares
    count = min(max(count, 3), joined)
    if count < joined and count % 2 == 0:
        count += 1
    threshold = secure.reconstruction_threshold
    needed = round(threshold * count) if isinstance(threshold, float) else threshold
    return count, min(max(needed, count // 2 + 1), count)
