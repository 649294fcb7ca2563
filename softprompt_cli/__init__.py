"""The ``softprompt`` command: ``serve``, ``prepare-model``, ``upload``, ``bench``, ``train``, ``eval``, ``eval-report``

This package sits above the others and is the only one that imports them all: each package adds its own
subcommands through a ``register(subparsers)`` function in its ``cli`` module (see :data:`COMMAND_MODULES`), so
the server never imports ``training`` or ``bench``. A ``register`` function adds parsers to ``subparsers`` and
gives each one of two defaults:

* ``func``: called with the parsed :class:`argparse.Namespace`; unknown arguments are an error;
* ``argv_func``: called with the list of arguments after the subcommand, which it parses itself (add the parser
  with ``add_help=False`` so ``--help`` reaches it).

Either returns the exit status. ``cli`` modules keep their top-level imports light (no torch, uvicorn or FastAPI)
so that ``softprompt --help`` is fast; the commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import importlib

# Registration order is the order ``softprompt --help`` lists the subcommands in.
COMMAND_MODULES = ("server.cli", "bench.cli", "training.cli")


def build_parser() -> argparse.ArgumentParser:
    """The root parser with every package's subcommands registered."""
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    argv_func = getattr(args, "argv_func", None)
    if argv_func is not None:
        return argv_func(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)

