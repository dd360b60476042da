"""``tokenmix train``: train a registered model (or ``small:MIXER``) on ``digits`` or an image
folder, with a checkpoint every epoch, ``--resume``, JSON-lines metrics, and data-parallel
training through PyTorch's own distributed stack::

    tokenmix train --model small:involution --data digits --epochs 10 --out runs/inv
    torchrun --nproc_per_node=2 -m tokenmix.train --model small:involution --data digits

The options are the fields of :class:`tokenmix.training.TrainConfig`; the work is in
:mod:`tokenmix.training` (the loop, checkpoints, distributed set-up). Under torchrun
(``RANK``/``WORLD_SIZE`` in the environment) the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, NCCL on GPU); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .cli import Command, add_import_argument, import_user_modules, report_errors
from .training import Interrupted, TrainConfig, add_config_arguments, config_from_args, train

_Interrupted = Interrupted  # the name the tests and older scripts use


def configure(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TrainConfig)


def run(args: argparse.Namespace) -> int:
    try:
        last = train(config_from_args(args, TrainConfig))
    except Interrupted as e:
        print(f"stopped after {e.args[0]} optimizer steps (--stop-after-steps); rerun with --resume",
              file=sys.stderr)
        return 3
    if last and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(last))
    return 0


COMMAND = Command(help="train a registered model (torchrun for several processes)", configure=configure, run=run)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m tokenmix.train ...`` / ``torchrun -m tokenmix.train ...``."""
    parser = argparse.ArgumentParser(prog="tokenmix.train", description=__doc__.splitlines()[0])
    add_import_argument(parser)
    configure(parser)
    args = parser.parse_args(argv)

    def go() -> int:
        import_user_modules(args.imports)
        return run(args)

    return report_errors("tokenmix.train", go)


if __name__ == "__main__":
    sys.exit(main())
