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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block); subparsers inherit the class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ksync", description="krause-sync: particle models of attention")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    try:  # an argument type that reads a file (e.g. a .npy matrix) may raise while parsing
        args, extra = parser.parse_known_args(argv)
    except (ValueError, TypeError, OSError) as err:
        where = f"ksync {argv[0]}" if argv and argv[0] in subparsers else "ksync"
        print(f"{where}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if extra:  # reported by the subcommand's parser, so the message names the subcommand
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError, KeyError, OSError) as err:
        print(f"ksync {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ksync {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
