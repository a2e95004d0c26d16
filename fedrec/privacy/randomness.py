"""Where DP noise and DP sampling draw their randomness from.

Anyone who can regenerate the noise can subtract it, and then ε protects nothing. So by default
every generator used for DP noise or DP sampling is seeded from the operating system's entropy
(``os.urandom``), never from the config. Opacus' own ``secure_mode`` needs ``torchcsprng``, which
has no build for this torch; a generator seeded from 64 bits of OS entropy is what its docs
suggest instead. A reproducible mode (``federated.reproducible_noise``) seeds them from the
config for simulations that must replay exactly; the privacy report then says the guarantee
does not hold against anyone who knows the seed.
"""

from __future__ import annotations

import os

import numpy as np
import torch


def private_seed() -> int:
    """64 bits from the operating system's entropy pool."""
    return int.from_bytes(os.urandom(8), "little")


def torch_generator(reproducible_seed: int | None) -> torch.Generator:
    """A torch generator for DP noise and Poisson masks: private unless a seed is given."""
    seed = private_seed() if reproducible_seed is None else reproducible_seed
    return torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


def numpy_generator(reproducible_seed: int | None) -> np.random.Generator:
    """A numpy generator for DP noise and client sampling: private unless a seed is given."""
    if reproducible_seed is None:
        return np.random.default_rng()  # numpy seeds it from the OS entropy pool
    return np.random.default_rng(reproducible_seed)
