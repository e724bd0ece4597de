"""CLI reliability pass (issue 9): every `ksync` subcommand given bad arguments or missing files
exits with status 2 and a one-line message, never a traceback.

The cases are generated from ``analysis.cli.build_parser()``, so subcommands added later are
covered too: an unknown option, missing required arguments, a bad value for every typed option,
a bad choice for every option with choices, and a missing file for every argument that names an
input file. Each case runs ``main(argv)`` in-process under a time limit (a subcommand that starts
real work instead of refusing its arguments fails the test rather than hanging it).
"""

import argparse
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from analysis.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SUBPARSERS = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
COMMANDS = sorted(SUBPARSERS)
OUTPUT_DESTS = {"output", "out", "outdir", "output_dir", "figure", "json"}
INPUT_DESTS = {"x0", "spec", "input", "inputs", "checkpoint", "hf", "config", "trajectories", "data", "path",
               "paths", "file", "files", "model_path", "store", "results"}
INPUT_HELP = re.compile(r"\.(npy|npz|nc|zarr|toml|pt|json)\b|\bfile\b|\bdirectory\b|\bpath\b", re.I)
LIMIT_S = 60


class StillRunning(BaseException):
    """Raised by the alarm; a BaseException so that the CLI's own error handling cannot swallow it."""


@contextmanager
def time_limit(seconds):
    def alarm(signum, frame):
        raise StillRunning(f"still running after {seconds} s: the bad argument was not refused early")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv, capsys):
    """(exit status, stderr) of `ksync argv` run in-process."""
    capsys.readouterr()
    with time_limit(LIMIT_S):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err, command=None):
    assert rc == 2, f"exit status {rc}, stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message, got {err!r}"
    prefix = f"ksync {command}" if command else "ksync"
    assert lines[0].startswith(prefix) and "error" in lines[0], lines[0]


def _actions(command):
    return [a for a in SUBPARSERS[command]._actions if not isinstance(a, argparse._HelpAction)]


def _required(command):
    """Actions that must be given: required options and positionals, and one per required group."""
    parser = SUBPARSERS[command]
    out = [a for a in _actions(command) if a.required]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            out.append(group._group_actions[0])
    return out


def _numeric(action):
    """The first of "1", "0.5" that the option's type accepts (None: not a numeric option)."""
    if action.type is None or action.nargs == 0:
        return None
    for candidate in ("1", "0.5"):
        try:
            action.type(candidate)
            return candidate
        except (argparse.ArgumentTypeError, TypeError, ValueError, OSError):
            pass
    return None


def _is_input(action) -> bool:
    if action.dest in OUTPUT_DESTS or action.choices or _numeric(action) is not None \
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                   argparse._CountAction)):
        return False
    return action.dest in INPUT_DESTS or bool(INPUT_HELP.search(action.help or ""))


def _value(action, tmp_path):
    """A placeholder that argparse accepts for ``action``."""
    if action.choices:
        return str(next(iter(action.choices)))
    if _numeric(action) is not None:
        return _numeric(action)
    if action.dest in OUTPUT_DESTS:
        return str(tmp_path / "out.nc")
    return str(tmp_path / "missing" / f"{action.dest}.npy")


def _argv(action, value):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return [action.option_strings[0]]
    return [action.option_strings[0], value] if action.option_strings else [value]


def _fill(command, tmp_path, skip=()):
    out = []
    for a in _required(command):
        if a not in skip:
            out += _argv(a, _value(a, tmp_path))
    return out


def _cases(kind):
    cases = []
    for command in COMMANDS:
        for a in _actions(command):
            if kind == "typed" and a.option_strings and a.type is not None and a.nargs != 0:
                cases.append(pytest.param(command, a.dest, id=f"{command}-{a.option_strings[0]}"))
            if kind == "choices" and a.option_strings and a.choices:
                cases.append(pytest.param(command, a.dest, id=f"{command}-{a.option_strings[0]}"))
            if kind == "input" and _is_input(a):
                cases.append(pytest.param(command, a.dest, id=f"{command}-{a.dest}"))
    return cases


def _action(command, dest):
    return next(a for a in _actions(command) if a.dest == dest)


# -- generic cases over every subcommand ---------------------------------------------------------
def test_subcommands_found(monkeypatch):
    import analysis.cli

    assert COMMANDS == sorted(["simulate", "bench", "figures", "train", "extract", "compare", "sweep"])
    assert sorted(analysis.cli.SUBCOMMANDS) == COMMANDS
    for command in COMMANDS:  # each module registered a parser that runs something
        assert callable(SUBPARSERS[command].get_default("func")), command
    # a subcommand whose module is missing is an error, not silently left out of the CLI
    monkeypatch.setattr(analysis.cli, "SUBCOMMANDS", (*analysis.cli.SUBCOMMANDS, "no_such_subcommand"))
    with pytest.raises(ModuleNotFoundError, match="no_such_subcommand"):
        build_parser()


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """The arguments of ``parser`` without help text, or with a default (not None/False) their help
    does not mention."""
    bad = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = action.help or ""
        if not text.strip() or text == argparse.SUPPRESS:
            bad.append(f"{name}: no help")
        elif action.default not in (None, False, argparse.SUPPRESS) and not action.required \
                and "default" not in text.lower():
            bad.append(f"{name}: default {action.default!r} not shown")
    return bad


def test_every_flag_has_help_and_shows_its_default():
    """Every argument of every subcommand has help text, and a default other than None/False is named
    in it (the flags of the packaging audit included), so ``ksync COMMAND --help`` documents them."""
    bad = {command: found for command in COMMANDS if (found := _undocumented(SUBPARSERS[command]))}
    assert not bad, f"undocumented arguments: {bad}"
    audited = {"train": ["--seed", "--attention", "--seeds"], "extract": ["--representation", "--sink-k"],
               "compare": ["--sink-k"], "sweep": ["--no-progress"]}
    for command, flags in audited.items():
        options = SUBPARSERS[command]._option_string_actions
        for flag in flags:
            assert options[flag].help, (command, flag)
            if options[flag].default not in (None, False):
                assert "default" in options[flag].help, (command, flag)
    for command in COMMANDS:
        SUBPARSERS[command].format_help()  # every help text formats (no stray %)
    # the check itself catches an argument without help or an unshown default
    probe = argparse.ArgumentParser()
    probe.add_argument("--quiet", action="store_true")
    probe.add_argument("--k", type=int, default=3, help="a number")
    probe.add_argument("--name", help="a name")
    assert _undocumented(probe) == ["--quiet: no help", "--k: default 3 not shown"]


def test_simulate_flags_come_from_the_parameter_table(capsys):
    """Every run and interaction parameter of simulate is a flag with its help text and default."""
    from particles.params import PARAMS

    flags = SUBPARSERS["simulate"]._option_string_actions
    for name, param in PARAMS.items():
        if param.group == "output":
            continue
        action = flags["--" + name.replace("_", "-")]
        assert action.help.startswith(param.help), name
        if name not in ("steps", "dt"):
            assert f"(default: {param.default if param.default is not None else 'off'})" in action.help, name
        if param.choices:
            assert set(action.choices) == {c for c in param.choices if c is not None}
    # the table's validators check the values while parsing
    cases = [("--sigma", "1e-300", "too small"), ("--window", "0", "window"), ("--seed", "-1", "seed"),
             ("--noise", "nan", "finite"), ("--Q", "[[1, 2]]", "square")]
    for flag, bad, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            SUBPARSERS["simulate"].parse_args(["--model", "sa", "--steps", "1", "--dt", "0.1", "-o", "x.nc",
                                               flag, bad])
        err = capsys.readouterr().err
        assert flag in err and message in err, err


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option(command, capsys, tmp_path):
    rc, err = run_cli([command, *_fill(command, tmp_path), "--no-such-option"], capsys)
    assert_one_line_error(rc, err, command)
    assert "--no-such-option" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_required_arguments(command, capsys):
    if not _required(command):
        pytest.skip(f"{command} has no required arguments")
    rc, err = run_cli([command], capsys)
    assert_one_line_error(rc, err, command)
    assert "required" in err


@pytest.mark.parametrize("command, dest", _cases("typed"))
def test_bad_typed_value(command, dest, capsys, tmp_path):
    action = _action(command, dest)
    bad = next((v for v in BAD_VALUES if not _accepts(action, v)), None)
    assert bad is not None, f"{action.option_strings[0]}: its type accepts every one of {BAD_VALUES}"
    rc, err = run_cli([command, *_fill(command, tmp_path, skip=(action,)), action.option_strings[0], bad],
                      capsys)
    assert_one_line_error(rc, err, command)
    assert action.option_strings[0] in err


BAD_VALUES = ("not-a-number!", "../escape", "nan", "inf", "-1")


def _accepts(action, value) -> bool:
    try:
        action.type(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError, OSError):
        return False
    return True


@pytest.mark.parametrize("command, dest", _cases("choices"))
def test_bad_choice(command, dest, capsys, tmp_path):
    action = _action(command, dest)
    rc, err = run_cli([command, *_fill(command, tmp_path, skip=(action,)), action.option_strings[0],
                       "bogus-choice"], capsys)
    assert_one_line_error(rc, err, command)
    assert "bogus-choice" in err


@pytest.mark.parametrize("command, dest", _cases("input"))
def test_missing_input_file(command, dest, capsys, tmp_path):
    action = _action(command, dest)
    missing = tmp_path / "missing" / f"no_such_{dest}.npy"
    rest = _fill(command, tmp_path, skip=(action,))
    if any(action in g._group_actions for g in SUBPARSERS[command]._mutually_exclusive_groups):
        # an alternative of a required group: give it instead of the group's first member
        group = next(g for g in SUBPARSERS[command]._mutually_exclusive_groups if action in g._group_actions)
        rest = _fill(command, tmp_path, skip=tuple(group._group_actions))
    rc, err = run_cli([command, *rest, *_argv(action, str(missing))], capsys)
    assert_one_line_error(rc, err, command)


def test_top_level_errors(capsys):
    rc, err = run_cli([], capsys)
    assert_one_line_error(rc, err)
    rc, err = run_cli(["no-such-command"], capsys)
    assert_one_line_error(rc, err)
    assert "no-such-command" in err


# -- specific cases --------------------------------------------------------------------------------
def test_simulate_missing_x0_names_the_file(capsys, tmp_path):
    missing = tmp_path / "nope.npy"
    rc, err = run_cli(["simulate", "--model", "sa", "--steps", "1", "--dt", "0.1", "--x0", str(missing),
                       "-o", str(tmp_path / "out.nc")], capsys)
    assert_one_line_error(rc, err, "simulate")
    assert "nope.npy" in err


def test_simulate_bad_parameter_value(capsys, tmp_path):
    rc, err = run_cli(["simulate", "--model", "krause", "--n", "4", "--d", "3", "--steps", "1", "--dt", "0.1",
                       "--sigma", "-1", "-o", str(tmp_path / "out.nc")], capsys)
    assert_one_line_error(rc, err, "simulate")
    assert "sigma" in err


SPEC = 'model = "hk"\nsteps = 3\ndt = 1.0\nseeds = 2\nmetrics = ["final_clusters"]\n' \
       '[fixed]\nn = 10\nd = 1\n[axes]\nradius = [0.1, 0.2]\n'


@pytest.mark.parametrize("text, message", [
    ("model = ", "not valid TOML"),
    ('model = "hk"\nsteps = 3\ndt = 1.0\nbeta = 1\n', "unknown key"),
    (SPEC.replace("radius = [0.1, 0.2]", "radius = [0.1, -0.2]"), "radius"),
    (SPEC.replace('"final_clusters"', '"no_metric"'), "unknown metric"),
    (SPEC.replace("[axes]", "[axes]\nseed = [1, 2]"), "seed"),
    (SPEC.replace("radius = [0.1, 0.2]", "radius = {start = 0.1}"), "range"),
])
def test_sweep_bad_spec(text, message, capsys, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    rc, err = run_cli(["sweep", str(spec), "-o", str(tmp_path / "r.zarr"), "--scheduler", "sync"], capsys)
    assert_one_line_error(rc, err, "sweep")
    assert message in err
    assert not (tmp_path / "r.zarr").exists()


def test_sweep_cli_options_and_changed_spec(capsys, tmp_path):
    spec, store = tmp_path / "spec.toml", tmp_path / "r.zarr"
    spec.write_text(SPEC)
    rc, err = run_cli(["sweep", str(spec), "-o", str(store), "--scheduler", "sync", "--workers", "2"], capsys)
    assert_one_line_error(rc, err, "sweep")
    rc, err = run_cli(["sweep", str(spec), "-o", str(store), "--workers", "0"], capsys)
    assert_one_line_error(rc, err, "sweep")
    assert main(["sweep", str(spec), "-o", str(store), "--scheduler", "sync", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    spec.write_text(SPEC.replace("seeds = 2", "seeds = 3"))
    rc, err = run_cli(["sweep", str(spec), "-o", str(store), "--scheduler", "sync"], capsys)
    assert_one_line_error(rc, err, "sweep")
    assert "different specification" in err and "seeds" in err
    # the output path is a file, not a store
    (tmp_path / "file.zarr").write_text("x")
    rc, err = run_cli(["sweep", str(spec), "-o", str(tmp_path / "file.zarr"), "--scheduler", "sync"], capsys)
    assert_one_line_error(rc, err, "sweep")


def test_sweep_unreachable_scheduler(capsys, tmp_path):
    import dask
    import distributed  # noqa: F401  (its config defaults first, so that set() restores them after)

    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        rc, err = run_cli(["sweep", str(spec), "-o", str(tmp_path / "r.zarr"), "--scheduler", "tcp://127.0.0.1:9",
                           "--no-progress", "--connect-timeout", "1"], capsys)
    assert_one_line_error(rc, err, "sweep")
    assert "127.0.0.1:9" in err
    assert not (tmp_path / "r.zarr").exists()


def test_console_script_exit_status_and_no_traceback(tmp_path):
    """The same contract through a real process (the console entry point)."""
    entry = "import sys; from analysis.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", entry, "sweep", str(tmp_path / "missing.toml"),
                           "-o", str(tmp_path / "r.zarr")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "missing.toml" in proc.stderr
