"""`ksync` command line: one module per subcommand, each exposing ``register(subparsers)``.

A subcommand module adds its parser and sets ``func(args) -> int``. Bad arguments or missing files
end with exit status 2 and a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("simulate", "bench", "figures", "train", "extract", "compare", "sweep")


class UsageError(Exception):
    """Raised by a subcommand for bad arguments: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ksync", description="krause-sync: particle models of attention")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"analysis.cli.{name}")
        except ModuleNotFoundError as err:  # a subcommand not built yet
            if err.name != f"analysis.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError, KeyError, OSError) as err:
        print(f"ksync {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
