"""Randomness as a pure function of integers: every generator of the package is seeded here.

``seed_of(seed, iteration, rank, purpose)`` folds a tuple of integers into one 63-bit seed
(``(((k0 * M + k1) * M + k2) ...) mod (2^63 - 1)``, ``M = 1_000_003``), so ``seed_of(seed, i) = seed * M + i`` for
small ``i``; a resumed run, another rank count or another batch size draws the same numbers for the same keys.

Example::

    from flowalign.seeding import generator
    noise = torch.randn(4, 16, 64, 64, generator=generator(seed, iteration, rank, 1))
"""

from __future__ import annotations

import torch

__all__ = ["generator", "seed_of"]

_M = 1_000_003


def seed_of(*keys: int) -> int:
    """One seed from a tuple of integers (seed, iteration, rank, purpose, ...)."""
    seed = 0
    for k in keys:
        seed = (seed * _M + int(k)) % (2**63 - 1)
    return seed


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by :func:`seed_of` ``(*keys)``."""
    return torch.Generator().manual_seed(seed_of(*keys))
