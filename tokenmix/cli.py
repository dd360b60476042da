"""tokenmix: compare, train and analyse convolution, involution and attention mixers.

Each subcommand lives in its own module and is imported only
when it runs, so ``tokenmix --help`` stays fast.

A subcommand module exposes a ``COMMAND = Command(help, configure, run)`` object:
``configure(parser)`` adds its arguments, ``run(args) -> int`` does the work.

User code: every subcommand takes ``--import MODULE`` (repeatable; a dotted module name or
a path to a ``.py`` file) and imports it before it resolves any name, so generators, mixers
and models registered there are usable by name. Installed packages can do the same through
the ``tokenmix.plugins`` entry-point group (each entry point is loaded before the command
runs).

A user mistake (a bad value, a missing or corrupt file, an unknown name) is reported as one
``tokenmix COMMAND: error: ...`` line with exit code 2; set ``TOKENMIX_TRACEBACK=1`` to get
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

PLUGIN_GROUP = "tokenmix.plugins"


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# name -> (module defining COMMAND, one-line help shown by `tokenmix --help`)
COMMANDS: Dict[str, tuple] = {
    "compare": ("tokenmix.compare", "train one small backbone per mixer on built-in data and compare"),
    "train": ("tokenmix.train", "train a registered model (torchrun for several processes)"),
    "zoo": ("tokenmix.analysis.cli_zoo", "the paper's Table 1 beside our params and GMACs (--all: every model)"),
    "flops": ("tokenmix.analysis.cli_flops", "FLOP breakdown of one model by module"),
    "mixers": ("tokenmix.analysis.cli_mixers", "params and MACs of every mixer preset"),
    "viz": ("tokenmix.analysis.cli_viz", "kernel heat maps of a mixer (paper figure 3)"),
    "build": ("tokenmix.build", "compile the CPU kernels now (ahead of the first use)"),
}


class UserCodeError(ValueError):
    """A ``--import`` module or a ``tokenmix.plugins`` entry point failed to import."""


def add_import_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE (a dotted module name or a .py file) before resolving names, so what it "
                        "registers is usable by name; repeatable")


def _import_path(path: Path):
    """Import a .py file as module ``tokenmix_user_<stem>_<hash of its path>`` (once per
    process: a second --import of the same file reuses the module, as ``import`` does)."""
    path = path.resolve()
    name = f"tokenmix_user_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserCodeError(f"--import {str(path)!r}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_user_modules(names: Sequence[str] = (), plugins: bool = True) -> List[object]:
    """Load the ``tokenmix.plugins`` entry points (when ``plugins``), then import each of
    ``names`` (a dotted module name, or a path ending in ``.py``). UserCodeError naming the
    module (or entry point) when one cannot be found or raises while importing."""
    modules = []
    if plugins:
        from importlib.metadata import entry_points

        for ep in entry_points(group=PLUGIN_GROUP):
            try:
                modules.append(ep.load())
            except Exception as e:
                raise UserCodeError(f"{PLUGIN_GROUP} entry point {ep.name!r} ({ep.value}) failed to load: "
                                    f"{type(e).__name__}: {e}") from e
    for name in names:
        looks_like_path = name.endswith(".py") or os.sep in name
        try:
            if looks_like_path:
                path = Path(name).expanduser()
                if not path.is_file():
                    raise UserCodeError(f"--import {name!r}: no such file")
                modules.append(_import_path(path))
            else:
                modules.append(importlib.import_module(name))
        except UserCodeError:
            raise
        except ModuleNotFoundError as e:
            raise UserCodeError(f"--import {name!r}: {e}") from e
        except Exception as e:
            raise UserCodeError(f"--import {name!r} failed: {type(e).__name__}: {e}") from e
    return modules


def report_errors(prog: str, fn: Callable[[], int]) -> int:
    """``fn()``, with a ValueError/TypeError/OSError (a user mistake: the message names the
    argument or the file) printed as one ``PROG: error: ...`` line and exit code 2."""
    try:
        return int(fn() or 0)
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("TOKENMIX_TRACEBACK"):
            raise
        msg = " ".join(str(e).split("\n")) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
            msg = f"{msg} ({e.filename})"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == selected:
            command = importlib.import_module(module).COMMAND
            add_import_argument(p)
            command.configure(p)
            p.set_defaults(_run=command.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected is not None and selected not in COMMANDS:
        print(f"tokenmix: error: unknown command {selected!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0

    def go() -> int:
        import_user_modules(args.imports)
        return args._run(args)

    return report_errors(f"tokenmix {args.command}", go)


if __name__ == "__main__":
    sys.exit(main())
