"""The fine-tuning methods, one file each, on one interface (:class:`flowalign.methods.base.Method`).

==========  ==============================================================  ==========================
algorithm   file                                                            kl_coef mapping
==========  ==============================================================  ==========================
acflow      ``acflow.py``: AC-Flow, critic-weighted flow matching + W2        w2_weight = kl_coef * beta
orw         ``orw.py``: ORW-CFM-W2, reward-weighted flow matching + W2        w2_weight = kl_coef * beta
grpo        ``grpo.py``: Flow-GRPO, clipped-ratio policy gradient + KL        grpo_kl_weight = kl_coef
nft         ``nft.py``: DiffusionNFT, implicit positive / negative policies   w2_weight = kl_coef / c
awm         ``awm.py``: Advantage Weighted Matching, ratio-clipped           w2_weight = kl_coef
==========  ==============================================================  ==========================

The four regression methods share ``flow_matching.py`` (states, minibatches, the actor step); a new method is
one file with a :class:`Method` subclass and one line in :data:`METHODS`. Its own knobs, if it has any, are a
dataclass section in that file (``Method.settings``), listed once more among ``ACFlowConfig``'s bases
(``flowalign/config.py``) so that YAML, the command line and ``--help`` see them (docs/extending.md).

Example::

    from flowalign.methods import METHODS, get_method
    sorted(METHODS)                   # ['acflow', 'awm', 'grpo', 'nft', 'orw']
    get_method("nft").kl_knobs(cfg, 0.3)
"""

from __future__ import annotations

from flowalign.methods import acflow, awm, grpo, nft, orw
from flowalign.methods.base import Method, Metrics, Rewards, Rollout, StateBatch

METHODS: dict[str, Method] = {m.name: m for m in (acflow.METHOD, orw.METHOD, grpo.METHOD, nft.METHOD, awm.METHOD)}

__all__ = ["METHODS", "Method", "Metrics", "Rewards", "Rollout", "StateBatch", "get_method"]


def get_method(name: str) -> Method:
    """The method registered as ``name``; a ``ValueError`` lists the others."""
    if name not in METHODS:
        raise ValueError(f"Unknown algorithm {name!r}; choose one of {tuple(METHODS)}.")
    return METHODS[name]
