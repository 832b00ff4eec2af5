"""``flowalign train --config FILE [--key value ...]``: fine-tune with AC-Flow, ORW-CFM-W2 or Flow-GRPO.

Every key of ``flowalign.ACFlowConfig`` can be set in the YAML file or overridden on the command line
(``--iterations 20 --algorithm orw``). Several processes / GPUs::

    accelerate launch --num_processes 2 -m flowalign.cli train --config samples/configs/acflow_shapes.yaml
"""

from __future__ import annotations

import argparse
import json

from flowalign.config import ACFlowConfig, add_config_arguments, config_overrides
from flowalign.trainer import ACFlowTrainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file of ACFlowConfig keys (default: all defaults).")
    add_config_arguments(parser)
    parser.epilog = "Every ACFlowConfig key may be set in the YAML file and overridden here (--iterations 20 --algorithm orw)."


def run(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    try:
        config = ACFlowConfig.from_yaml(args.config, overrides) if args.config else ACFlowConfig.from_dict(overrides)
    except ValueError as err:
        raise SystemExit(f"flowalign train: {err}") from None
    trainer = ACFlowTrainer(config)
    result = trainer.train()
    if trainer.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "per_image"}, indent=1))
    return 0
