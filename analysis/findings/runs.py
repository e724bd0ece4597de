"""A resumable driver for training experiments: one directory per finished run, moved into place.

A *plan* is a list of :class:`Run` (experiment, variant, seed, task, attention, training options).
:func:`run_plan` trains each run that is not yet on disk, measures it on held-out inputs
(:func:`analysis.findings.measure.measure`) and writes ``ROOT/<experiment>/<variant>-s<seed>/``
with ``model.pt`` (weights), ``model.json`` (its checkpoint card, with the run, probes and loss
curve) and
``measure.nc`` — first into a temporary sibling, then ``os.replace``-d into place, so a run is
either complete on disk or absent. A stopped driver resumes by skipping the finished runs; the same
seed gives the same weights (single-threaded, seeded), so a resumed plan ends with the results an
uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DONE = "model.json"  # the checkpoint card (+ run, probes), written last


@dataclass(frozen=True)
class Run:
    experiment: str
    variant: str
    seed: int
    task: str
    attention: object  # a name of the task's attentions or a spec dict
    train: dict = field(default_factory=dict)  # epochs / steps / lr / overrides / subset / probe_every
    probe: str | None = None  # "first_token": α₀ per layer on fixed held-out windows during training
    n_measure: int = 256  # held-out inputs measured after training (0: none)

    @property
    def run_id(self) -> str:
        return f"{self.variant}-s{self.seed}"

    def path(self, root) -> Path:
        return Path(root) / self.experiment / self.run_id


def is_done(run: Run, root) -> bool:
    return (run.path(root) / DONE).exists()


def held_out(task: str, n: int):
    """The first ``n`` held-out inputs of ``task`` (fixed order)."""
    from particles.nn import TASKS

    if hasattr(TASKS.get(task), "held_out"):  # tasks with their own held-out inputs
        t = TASKS[task]()
        t.setup()
        return t.held_out(n)
    from analysis.bridge.data import task_inputs

    return task_inputs(task, n)[0]


def _probe(run: Run):
    if run.probe is None:
        return None
    if run.probe == "first_token":
        from .measure import first_token_probe

        return first_token_probe(held_out(run.task, 64))
    if run.probe == "backcopy":
        from particles.nn import TASKS

        from .measure import backcopy_probe

        windows = held_out(run.task, 64)
        return backcopy_probe(windows, TASKS[run.task]().active_rows(windows))
    raise ValueError(f"probe must be None, 'first_token' or 'backcopy', got {run.probe!r}")


def execute(run: Run, root, *, progress: bool = False) -> Path:
    """Train, measure and write one run (atomically); returns its directory."""
    from particles.nn import save_checkpoint, train

    final = run.path(root)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover (same pid can only be a re-run in this process)
    tmp.mkdir(parents=True)
    kw = dict(run.train)
    model, card = train(run.task, run.attention, seed=run.seed, probe=_probe(run), progress=progress, **kw)
    card = save_checkpoint(model, card, tmp / "model")
    if run.n_measure:
        t0 = time.perf_counter()
        try:
            write_measure(run, model, tmp)
            card["measure_time_s"] = round(time.perf_counter() - t0, 2)
        except Exception as err:  # the weights are saved: measure_missing() can redo it later
            card["measure_error"] = repr(err)
    card["run"] = json.loads(json.dumps(asdict(run)))
    (tmp / DONE).write_text(json.dumps(card, indent=1) + "\n")  # load_checkpoint(dir / "model") reads it
    os.replace(tmp, final)
    return final


def write_measure(run: Run, model, directory) -> Path:
    """``directory/measure.nc``: :func:`~analysis.findings.measure.measure` on the run's held-out inputs."""
    import torch

    from particles.conventions import encode

    from .measure import measure

    with torch.no_grad():
        m = measure(model, held_out(run.task, run.n_measure))
    m.attrs.update(experiment=run.experiment, variant=run.variant, seed=run.seed, task=run.task)
    path = Path(directory) / "measure.nc"
    tmp = path.with_name(f".measure.nc.tmp-{os.getpid()}")
    encode(m).to_netcdf(tmp)
    os.replace(tmp, path)
    return path


def measure_missing(plan, root, *, redo: bool = False, log=print) -> int:
    """Measure the finished runs of ``plan`` that have no measure.nc (all of them with ``redo``)."""
    from particles.nn import load_checkpoint

    count = 0
    for run in plan:
        d = run.path(root)
        if not run.n_measure or not is_done(run, root) or ((d / "measure.nc").exists() and not redo):
            continue
        write_measure(run, load_checkpoint(d / "model"), d)
        count += 1
        log(f"measured {run.experiment}/{run.run_id}")
    return count


def run_plan(plan, root, *, log=print, progress: bool = False) -> list[Path]:
    """Execute every unfinished run of ``plan`` in order; finished runs are skipped."""
    root = Path(root)
    done = []
    for i, run in enumerate(plan):
        if is_done(run, root):
            done.append(run.path(root))
            continue
        t0 = time.time()
        path = execute(run, root, progress=progress)
        card = json.loads((path / DONE).read_text())
        log(
            f"[{i + 1}/{len(plan)}] {run.experiment}/{run.run_id}: {_headline(card)} "
            f"train {card['train_time_s']:.0f} s, total {time.time() - t0:.0f} s, "
            f"load {os.getloadavg()[0]:.2f}"
        )
        done.append(path)
    return done


def _headline(card: dict) -> str:
    m = card["metrics"]
    return ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float))


def load_runs(root, experiment: str) -> list[dict]:
    """The finished runs of ``experiment``: [{"card": …, "measure": Dataset or None, "path": …}]."""
    import xarray as xr

    from particles.conventions import decode

    out = []
    for d in sorted((Path(root) / experiment).glob("*-s*")):
        if d.name.startswith(".") or not (d / DONE).exists():
            continue
        card = json.loads((d / DONE).read_text())
        meas = None
        if (d / "measure.nc").exists():
            with xr.open_dataset(d / "measure.nc") as ds:
                meas = decode(ds.load())
        out.append(dict(card=card, measure=meas, path=d))
    return out
