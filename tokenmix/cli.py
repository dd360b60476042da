"""tokenmix: compare, train and analyse convolution, involution and attention mixers.

Each subcommand lives in its own module and is imported only
when it runs, so ``tokenmix --help`` stays fast.

A subcommand module exposes a ``COMMAND = Command(help, configure, run)`` object:
``configure(parser)`` adds its arguments, ``run(args) -> int`` does the work.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# name -> (module defining COMMAND, one-line help shown by `tokenmix --help`)
COMMANDS: Dict[str, tuple] = {
    "compare": ("tokenmix.compare", "train one small backbone per mixer on built-in data and compare"),
    "train": ("tokenmix.train", "train a registered model (torchrun for several processes)"),
    "zoo": ("tokenmix.analysis.cli_zoo", "params and GMACs of the model zoo beside the paper's numbers"),
    "flops": ("tokenmix.analysis.cli_flops", "FLOP breakdown of one model by module"),
    "mixers": ("tokenmix.analysis.cli_mixers", "params and MACs of every mixer preset"),
    "viz": ("tokenmix.analysis.cli_viz", "kernel heat maps of a mixer (paper figure 3)"),
}


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == selected:
            command = importlib.import_module(module).COMMAND
            command.configure(p)
            p.set_defaults(_run=command.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected is not None and selected not in COMMANDS:
        print(f"tokenmix: unknown command {selected!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
