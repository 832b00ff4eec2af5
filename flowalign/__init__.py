"""flowalign: align text-to-image flow-matching models with reward models.

Public entry points live in small modules:

- ``flowalign.tiny``: the offline tiny SD3 world (components, embedded base model, evaluation).
- ``flowalign.shapes``: the procedural shapes data set and its exact verifier.
- ``flowalign.pipelines``: diffusers pipelines (RLG).
- ``flowalign.rewards``: reward-model plug-ins.
- ``flowalign.checkpoints``: crash-safe checkpoint writing and safe (no arbitrary unpickling) loading.

Example::

    import flowalign
    config = flowalign.ACFlowConfig(iterations=2)   # imports flowalign.trainer on first access
"""

import importlib as _importlib

__version__ = "0.1.0"

_LAZY = {"ACFlowConfig": "flowalign.trainer", "ACFlowTrainer": "flowalign.trainer"}


def __getattr__(name):  # lazy, so `import flowalign` and `flowalign --help` stay fast
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flowalign' has no attribute {name!r}")
