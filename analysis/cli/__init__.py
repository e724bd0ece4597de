"""`ksync` command line: one module per subcommand, each exposing ``register(subparsers)``.

A subcommand module adds its parser and sets ``func(args) -> int``. Every failure — bad arguments,
missing files, a refused output path, an error inside the computation — ends with exit status 2
and a one-line message on stderr, never a traceback (``main(argv)`` returns 2; only ``--help`` and
``--version`` raise SystemExit(0)); ``--debug`` (anywhere on the command line, or
the environment variable ``KSYNC_DEBUG=1``) prints the traceback before that line. Ctrl-C exits
with status 130.

Outputs (``-o``) follow the data-safety rules of ``particles.store`` (docs/data-safety.md): an
existing path that krause-sync did not write is refused, one of ours is replaced only with
``--force``, one writer per output (a lock), written under a temporary name and moved into place.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings

SUBCOMMANDS = ("simulate", "bench", "figures", "train", "extract", "compare", "sweep")


class UsageError(Exception):
    """Raised by a subcommand for bad arguments: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block); subparsers inherit the class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


#: exception types whose message is self-explanatory (no type name printed before it)
_PLAIN = (UsageError, ValueError, TypeError, OSError)


def _describe(err: BaseException) -> str:
    text = _one_line(err)
    if isinstance(err, _PLAIN) and text and not isinstance(err, (KeyError, IndexError)):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def build_parser() -> argparse.ArgumentParser:
    """The ``ksync`` parser with every subcommand (ImportError if a subcommand module is missing)."""
    parser = _Parser(prog="ksync", description="krause-sync: particle models of attention",
                     epilog="--debug (anywhere on the line) shows the traceback of a failure")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    from particles import __version__

    parser.add_argument("--version", action="version", version=f"ksync (krause-sync) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"analysis.cli.{name}").register(sub)
    return parser


def _fail(where: str, err: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(f"{where}: error: {_describe(err)}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("KSYNC_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    where = f"ksync {argv[0]}" if argv and argv[0] in subparsers else "ksync"
    # warnings are held back: after a failure they would break the one-line message (they are
    # shown with --debug); after success they are printed, one line each
    with warnings.catch_warnings(record=True) as caught:
        try:  # an argument type that reads a file (e.g. a .npy matrix) may raise while parsing
            args, extra = parser.parse_known_args(argv)
            if extra:  # reported by the subcommand's parser, so the message names the subcommand
                subparsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
            rc = int(args.func(args) or 0)
        except SystemExit as stop:  # argparse: a usage error (already printed) returns its status;
            if stop.code in (0, None):  # --help and --version still exit
                raise
            return stop.code if isinstance(stop.code, int) else 2
        except KeyboardInterrupt:
            print(f"{where}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:
            if debug:
                _show(caught)
            return _fail(where, err, debug)
    _show(caught)
    return rc


def _show(caught) -> None:
    for w in caught:
        print(f"{w.category.__name__}: {_one_line(w.message)} ({os.path.basename(w.filename)}:{w.lineno})",
              file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
