"""Helpers for the notebooks: run a model from widget values, plot particles, build the widget panel,
export an animation.

The notebooks in ``notebooks/`` hold no long code; they call these functions. Everything here works
without a browser (the figures are plain matplotlib ``Figure`` objects, the panel is an ipywidgets
``VBox``), so the notebooks can be executed headless in the tests.

* :func:`run` — :func:`particles.simulate` with only the parameters that make sense for the model.
* :func:`project` — particle coordinates for display: as is for d ≤ 3, otherwise onto the three
  leading (uncentred) principal directions of the whole trajectory (then radially back onto S²
  for the sphere).
* :func:`plot_state` — one frame: particles (on S² for d = 3) next to the cluster count over time.
* :func:`panel` — the ipywidgets exploration panel of ``01_cluster_formation.ipynb``.
* :func:`export_animation` — GIF (PillowWriter) or MP4 (FFMpegWriter) of a trajectory, or ``None``
  when the writer is not available.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import xarray as xr

from particles.interaction import MODELS
from particles.params import INTERACTION, PARAMS, applies_to  # the one description of simulate's parameters

SPHERE_MODELS = ("sa", "usa", "krause")


# ----------------------------------------------------------------------------------------- running
#: The panel's controls besides "model": simulate parameters, in display order, with the slider
#: ranges that suit exploring (``base``: a log slider over base**min … base**max) and the starting
#: values. The widget kind, label and tooltip come from particles.params.PARAMS (kind, the presets a
#: parameter applies to, help text); an optional parameter (default None) is off at 0.
PANEL = {
    "beta": dict(value=4.0, base=10, min=-1, max=1.5, step=0.05),
    "sigma": dict(value=0.3, base=10, min=-1.5, max=1, step=0.05),
    "radius": dict(value=0.0, min=0, max=2, step=0.02),
    "window": dict(value=0, min=0, max=64),
    "causal": dict(value=False),
    "top_k": dict(value=0, min=0, max=64),
    "n": dict(value=48, min=4, max=256),
    "d": dict(value=3, min=1, max=16),
    "steps": dict(value=150, min=10, max=1000, step=10),
    "dt": dict(value=0.2, min=0.01, max=1.0, step=0.01),
    "seed": dict(value=0),
}
SYMBOLS = {"beta": "β", "sigma": "σ"}
_CAST = {"int": int, "seed": int, "float": float, "bool": bool}


def _cast(name: str, value):
    """A widget value as the type PARAMS gives the parameter (int, float, bool; others as given)."""
    return _CAST.get(PARAMS[name].kind, lambda v: v)(value)


def _off(name: str, value) -> bool:
    """Widget convention: None, False, or 0 for an optional parameter (default None), means "off"."""
    p = PARAMS[name]
    return value is None or (p.kind == "bool" and not value) or (
        p.default is None and p.kind in ("int", "float") and not value)


def model_params(model: str, **values) -> dict:
    """The keyword arguments of :func:`particles.simulate` that apply to `model`.

    values: interaction parameters of ``particles.params.PARAMS`` (beta, sigma, radius, window,
    causal, top_k, …). Widget conventions: ``radius``/``window``/``top_k`` of ``None`` or ``0``
    mean "off"; ``beta`` and ``sigma`` are passed only to the models they apply to
    (``particles.params.applies_to``: beta for sa/usa, sigma for krause); hk needs a radius (> 0).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    unknown = sorted(k for k in values if k not in PARAMS or PARAMS[k].group != "interaction")
    if unknown:
        raise TypeError(f"unknown model parameter(s) {unknown}; known: {list(INTERACTION)}")
    params = {name: _cast(name, value) for name, value in values.items()
              if name in applies_to(model) and not _off(name, value)}
    if model == "hk" and "radius" not in params:
        raise ValueError("radius must be > 0 for the 'hk' model")
    return params


def run(model: str = "krause", *, n: int = 48, d: int = 3, steps: int = 120, dt: float = 0.1,
        seed: int = 0, save_every: int = 1, **params) -> xr.Dataset:
    """Simulate `model` from widget-style values (see :func:`model_params`); returns the Dataset."""
    from particles import simulate

    given = dict(n=n, d=d, steps=steps, dt=dt, seed=seed, save_every=save_every)
    return simulate(model, **{k: _cast(k, v) for k, v in given.items()}, **model_params(model, **params))


def default_eps(ds: xr.Dataset) -> float:
    """A cluster threshold that suits the run: 0.05 on the sphere, a tenth of the radius for HK."""
    radius = ds.attrs.get("radius")
    if ds.attrs.get("geometry") == "euclidean" and radius:
        return float(min(0.05, 0.1 * radius))
    return 0.05


def cluster_counts(ds: xr.Dataset, eps: float | None = None) -> xr.DataArray:
    """Number of clusters (graph components at distance ≤ eps) at every saved time."""
    import analysis

    return analysis.count_clusters(ds["x"], eps=default_eps(ds) if eps is None else eps)


# ------------------------------------------------------------------------------------- projection
def project(x, sphere: bool = True, basis: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates to draw, shape (..., min(d, 3)), and the projection basis used (d × k).

    d ≤ 3: the coordinates themselves. d > 3: onto the three leading principal directions of all
    points in `x` (one fixed basis for a whole trajectory, so an animation does not jump), then,
    for the sphere, normalised back onto S² (a radial projection: angles are distorted, clusters
    are kept).
    """
    x = np.asarray(x, dtype=float)
    d = x.shape[-1]
    if d <= 3:
        return x, np.eye(d)
    if basis is None:
        flat = x.reshape(-1, d)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)  # uncentred: directions through 0
        basis = vt[:3].T
    y = x @ basis
    if sphere:
        norms = np.linalg.norm(y, axis=-1, keepdims=True)
        y = y / np.where(norms > 0, norms, 1.0)
    return y, basis


def _draw_sphere(ax):
    u, v = np.mgrid[0:2 * np.pi:24j, 0:np.pi:12j]
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v),
                      color="0.85", linewidth=0.4)


def _particles_axes(fig, dims: int, sphere: bool, spec):
    if dims == 3:
        ax = fig.add_subplot(spec, projection="3d")
        if sphere:
            _draw_sphere(ax)
            ax.set(xlim=(-1, 1), ylim=(-1, 1), zlim=(-1, 1))
        ax.set_box_aspect((1, 1, 1))
        ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
        return ax
    ax = fig.add_subplot(spec)
    if dims == 2 and sphere:
        t = np.linspace(0, 2 * np.pi, 200)
        ax.plot(np.cos(t), np.sin(t), color="0.85", linewidth=0.8)
        ax.set_aspect("equal")
    return ax


def _draw_particles(ax, y, dims, colors):
    if dims == 3:
        return ax.scatter(y[:, 0], y[:, 1], y[:, 2], c=colors, s=14, depthshade=False)
    if dims == 2:
        return ax.scatter(y[:, 0], y[:, 1], c=colors, s=14)
    return ax.scatter(np.zeros(len(y)), y[:, 0], c=colors, s=14)


def plot_state(ds: xr.Dataset, frame: int = -1, eps: float | None = None, counts=None, fig=None):
    """One frame of a trajectory: particles (left) and the cluster count over time (right).

    d = 3 on the sphere: points on S² with a wireframe; d > 3: the projection of :func:`project`;
    d = 2: the plane (circle for the sphere); d = 1 (HK opinions): all trajectories over time.
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    x = np.asarray(ds["x"].values)
    times = np.asarray(ds["time"].values)
    frame = int(frame) % len(times)
    sphere = ds.attrs.get("geometry", "sphere") == "sphere"
    counts = cluster_counts(ds, eps) if counts is None else counts
    d = x.shape[-1]
    if fig is None:
        fig = plt.figure(figsize=(9.5, 4.2))
    else:
        fig.clear()
    grid = fig.add_gridspec(1, 2, width_ratios=(1.15, 1))
    n = x.shape[1]
    colors = plt.cm.viridis(np.linspace(0, 1, n))
    if d == 1:
        ax = fig.add_subplot(grid[0])
        ax.plot(times, x[:, :, 0], color="0.3", linewidth=0.6)
        ax.axvline(times[frame], color="C3", linewidth=1)
        ax.set(xlabel="time", ylabel="opinion", title=f"{ds.attrs.get('model', '')}: opinions, n = {n}")
    else:
        y, _ = project(x, sphere=sphere)
        dims = y.shape[-1]
        ax = _particles_axes(fig, dims, sphere, grid[0])
        _draw_particles(ax, y[frame], dims, colors)
        if d > 3:
            where = f"S^{d - 1}, projected" if sphere else f"R^{d}, projected"
        else:
            where = {3: "S²", 2: "S¹"}[d] if sphere else f"R^{d}"
        ax.set_title(f"{ds.attrs.get('model', '')}: n = {n} on {where}, t = {times[frame]:.2f}")
    axc = fig.add_subplot(grid[1])
    axc.step(times, np.asarray(counts), where="post", color="C0")
    axc.axvline(times[frame], color="C3", linewidth=1)
    axc.set(xlabel="time", ylabel="clusters", title="cluster count", ylim=(0, None))
    axc.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def figure_png(fig, dpi: int = 80) -> bytes:
    """The PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ panel
def _label(name: str) -> str:
    """β (sa/usa), σ (krause), radius (0=off), …: the parameter, the presets it applies to, and 0=off
    for an optional interaction parameter (all read from particles.params.PARAMS)."""
    p = PARAMS[name]
    label = SYMBOLS.get(name, name)
    if p.models:
        label += f" ({'/'.join(p.models)})"
    if p.group == "interaction" and p.default is None:
        label += " (0=off)"
    return label


def _widget(name: str, value):
    """The control of parameter `name`: its kind (PARAMS) picks the widget, PANEL the range."""
    import ipywidgets as W

    kind = PARAMS[name].kind
    opts = {k: v for k, v in PANEL[name].items() if k != "value"}
    if kind == "bool":
        cls = W.Checkbox
    elif kind == "seed":
        cls = W.IntText
    elif kind == "int":
        cls = W.IntSlider
    else:
        cls = W.FloatLogSlider if "base" in opts else W.FloatSlider
    return cls(value=value, description=_label(name), tooltip=PARAMS[name].help, **opts)


def panel(model: str = "krause", *, eps: float | None = None, **values):
    """The exploration panel: controls for the model and its parameters, the plot as a PNG image.

    values: starting values of the controls (the parameters of :data:`PANEL`: beta, sigma, radius,
    window, causal, top_k, n, d, steps, dt, seed; the rest keep PANEL's). Any change of a model
    control re-simulates; the time slider only redraws. The returned VBox has attributes
    ``controls`` (dict of widgets), ``image`` (``ipywidgets.Image``), ``status``
    (``ipywidgets.HTML``), ``update()`` (re-simulate now) and ``dataset()`` (the last run).
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt

    unknown = sorted(set(values) - set(PANEL))
    if unknown:
        raise TypeError(f"panel: unknown control(s) {unknown}; known: {list(PANEL)}")
    style = {"description_width": "105px"}
    layout = W.Layout(width="340px")
    c = {"model": W.Dropdown(options=list(MODELS), value=model, description="model")}
    c.update({name: _widget(name, values.get(name, spec["value"])) for name, spec in PANEL.items()})
    for w in c.values():
        w.style = style
        w.layout = layout
        if hasattr(w, "continuous_update"):
            w.continuous_update = False
    frame = W.IntSlider(value=0, min=0, max=1, description="frame (time)", continuous_update=False,
                        style=style, layout=W.Layout(width="680px"))
    image = W.Image(format="png", layout=W.Layout(width="760px"))
    status = W.HTML()
    state: dict = {}
    fig = plt.figure(figsize=(9.5, 4.2))
    plt.close(fig)  # drawn into the Image widget only, never shown twice by the inline backend

    def redraw(*_):
        if "ds" not in state:
            return
        plot_state(state["ds"], frame=frame.value, counts=state["counts"], fig=fig)
        image.value = figure_png(fig)

    def update(*_):
        v = {k: w.value for k, w in c.items() if k != "model"}
        model = c["model"].value
        if model == "hk" and not v["radius"]:
            c["radius"].value = 0.2  # hk needs a confidence radius; observing radius re-runs update
            return
        status.value = "<i>simulating…</i>"
        try:
            ds = run(model, save_every=max(1, v["steps"] // 100), **v)
        except (ValueError, TypeError, FloatingPointError, OverflowError) as err:
            status.value = f"<b style='color:#b00'>{type(err).__name__}: {err}</b>"
            return
        state["ds"] = ds
        state["counts"] = cluster_counts(ds, eps)
        final = int(state["counts"][-1])
        status.value = f"{model}: {final} cluster(s) at t = {float(ds.time[-1]):.2f}"
        with frame.hold_trait_notifications():
            frame.max = len(ds.time) - 1
            frame.value = frame.max
        redraw()

    for w in c.values():
        w.observe(update, names="value")
    frame.observe(redraw, names="value")
    names = list(c)
    half = (len(names) + 1) // 2
    left, right = W.VBox([c[k] for k in names[:half]]), W.VBox([c[k] for k in names[half:]])
    box = W.VBox([W.HBox([left, right]), frame, status, image])
    box.controls, box.image, box.status, box.frame = c, image, status, frame
    box.update, box.dataset = update, (lambda: state.get("ds"))
    update()
    return box


# -------------------------------------------------------------------------------------- animation
def export_animation(ds: xr.Dataset, path, *, fps: int = 12, eps: float | None = None,
                     max_frames: int = 60, dpi: int = 72):
    """Write the trajectory as an animation; returns the path, or ``None`` if no writer is available.

    ``.gif`` uses matplotlib's PillowWriter (needs Pillow), ``.mp4`` the FFMpegWriter (needs
    ffmpeg on PATH). At most `max_frames` evenly spaced saved frames are drawn.
    """
    import matplotlib.pyplot as plt
    from matplotlib import animation

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        if not animation.writers.is_available("pillow"):
            return None
        writer = animation.PillowWriter(fps=fps)
    elif suffix == ".mp4":
        if not animation.writers.is_available("ffmpeg"):
            return None
        writer = animation.FFMpegWriter(fps=fps)
    else:
        raise ValueError(f"path must end in .gif or .mp4, got {path.name!r}")
    counts = cluster_counts(ds, eps)
    frames = np.unique(np.linspace(0, ds.sizes["time"] - 1, min(max_frames, ds.sizes["time"])).astype(int))
    fig = plt.figure(figsize=(9.5, 4.2))
    try:
        anim = animation.FuncAnimation(fig, lambda k: plot_state(ds, k, counts=counts, fig=fig).axes,
                                       frames=frames, blit=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        anim.save(path, writer=writer, dpi=dpi)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- figures
def show_figure(name: str, *, quick: bool = True, out=None, display_image: bool = True) -> xr.Dataset:
    """Make the ``ksync figures`` figure `name` (``analysis.figures.FIGURES``) into `out` (default: a
    temporary folder), show its PNG and caption in the notebook, and return the Dataset it plots.

    ``quick=True`` is the small version used by the tests (seconds); ``quick=False`` is the full one.
    """
    import tempfile

    from analysis import figures
    if name not in figures.FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(figures.FIGURES)}")
    out = Path(out) if out is not None else Path(tempfile.gettempdir()) / "krause-sync-figures"
    ds = figures.FIGURES[name](quick=quick, out=out, progress=False)
    if display_image:
        from IPython.display import Image, Markdown, display

        display(Image(filename=str(out / f"{name}.png"), width=900))
        display(Markdown(f"*{ds.attrs.get('caption', '')}*"))
    return ds


# ---------------------------------------------------------------------------- trained models (03)
RESTRICTION_KEYS = ("grid", "window", "top_k", "sigma", "causal")

def checkpoint_table(root=None):
    """A pandas DataFrame with one row per checkpoint in ``root`` (default: the shipped checkpoints)
    — task, attention, seed, layers, width, test metrics, file — found by the one card scanner
    :func:`particles.nn.checkpoint.list_cards` (cards with their weights only, so other JSON files
    such as ``ablations.json`` are not rows); empty when there are none."""
    import pandas as pd

    from particles.nn.checkpoint import list_cards, shipped_dir

    rows = []
    for card_path, card in list_cards(shipped_dir() if root is None else root, with_weights=True):
        cfg = card.get("config", {})
        att = cfg.get("attention", {}) if isinstance(cfg.get("attention"), dict) else {}
        rows.append({
            "task": card.get("task"), "attention": card.get("attention"), "seed": card.get("seed"),
            "layers": cfg.get("n_layers"), "d_model": cfg.get("d_model"), "heads": cfg.get("n_heads"),
            "restrictions": ", ".join(f"{k}={att[k]}" for k in RESTRICTION_KEYS if k in att),
            **{k: round(v, 4) for k, v in card.get("metrics", {}).items() if isinstance(v, float)},
            "weights present": card_path.with_suffix(".pt").exists(),
            "file": card_path.with_suffix(".pt").name,
        })
    return pd.DataFrame(rows)


def default_task(cards) -> str | None:
    """The task of :func:`checkpoint_table` with the most attention kinds present (e.g. both krause
    and softmax, so the two can be compared); ties go to the first in file order; None if empty."""
    if len(cards) == 0:
        return None
    present = cards[cards["weights present"]] if "weights present" in cards else cards
    if len(present) == 0:
        return None
    kinds = present.groupby("task", sort=False)["attention"].nunique()
    return str(kinds.idxmax())


def plot_layers(cmp: xr.Dataset, variables=("clusters", "effective_rank", "first_token_mass", "sink_rate"),
                title: str | None = None):
    """Per-layer curves of ``analysis.bridge.compare`` output, one line per "model" entry, one panel
    per variable (variables the comparison lacks are skipped). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    variables = [v for v in variables if v in cmp]
    fig, axes = plt.subplots(1, len(variables), figsize=(3.6 * len(variables), 3.3), squeeze=False)
    styles = {"trained": "-o", "own": "--s", "sa": ":^", "krause": "-.v"}
    for ax, var in zip(axes[0], variables):
        for k, name in enumerate(cmp["model"].values):
            y = cmp[var].sel(model=name)
            if bool(np.all(np.isnan(y.values))):
                continue
            style = next((s for key, s in styles.items() if key in str(name).lower()), "-o")
            ax.plot(cmp["layer"].values, y.values, style, color=f"C{k}", label=str(name), ms=4)
        ax.set(title=var.replace("_", " "), xlabel="layer")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
