"""Figures of the write-up: metric heatmaps, t-SNE beside k-means, loss curves, VSC sparsity."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, to_rgba
from matplotlib.figure import Figure

from .._data import obs_column
from ._utils import _savefig_or_show

__all__ = [
    "gene_programs",
    "integration_scores",
    "loss_curves",
    "metrics_heatmap",
    "spike_probabilities",
    "tsne_kmeans",
]

_SUMMARY_COLUMNS = ("rep", "metric", "mean", "std")
_NA_COLOR = "lightgray"


def _rep_name(rep: str) -> str:
    """``"X_vsc"`` -> ``"vsc"``; other names are kept."""
    return rep[2:] if rep.startswith("X_") and len(rep) > 2 else rep


def _as_tuple(value: str | Sequence[str], name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    values = tuple(value)
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"`{name}` must be a string or a non-empty sequence of strings.")
    return values


def _get_summary(data: AnnData | pd.DataFrame, key: str) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        summary = data
    elif isinstance(data, AnnData):
        if key not in data.uns:
            raise KeyError(
                f"adata.uns[{key!r}] not found: run sv.tl.evaluate(adata, label_key) first "
                f"(or pass key= if it was run with key_added=). uns keys: {sorted(data.uns)}."
            )
        record = data.uns[key]
        if not isinstance(record, dict) or "summary" not in record:
            raise KeyError(
                f"adata.uns[{key!r}] has no 'summary': it was not written by sv.tl.evaluate. "
                "Run sv.tl.evaluate(adata, label_key) first."
            )
        summary = record["summary"]
        if not isinstance(summary, pd.DataFrame):
            summary = pd.DataFrame(summary)
    else:
        raise TypeError(
            f"`data` must be an AnnData or the summary DataFrame of sv.tl.evaluate, "
            f"got {type(data).__name__}."
        )
    missing = [c for c in _SUMMARY_COLUMNS if c not in summary.columns]
    if missing:
        raise KeyError(
            f"The summary lacks the column(s) {missing}; it needs {list(_SUMMARY_COLUMNS)} "
            f"(the tidy table of sv.tl.evaluate), has {list(summary.columns)}."
        )
    return summary


def _wide(summary: pd.DataFrame, value: str) -> pd.DataFrame:
    """Rows: reps in order of appearance; columns: metrics."""
    dup = summary.duplicated(["rep", "metric"])
    if dup.any():
        first = summary.loc[dup, ["rep", "metric"]].iloc[0].tolist()
        raise ValueError(f"The summary has more than one row for (rep, metric) = {tuple(first)}.")
    table = summary.pivot(index="rep", columns="metric", values=value)
    order = list(dict.fromkeys(summary["rep"]))
    return table.loc[order].astype(float)


def _reference_table(reference: pd.DataFrame) -> pd.DataFrame:
    """A reference as rep-name rows x metric columns, from a tidy or a wide DataFrame."""
    if not isinstance(reference, pd.DataFrame):
        raise TypeError(f"`reference` must be a DataFrame or None, got {type(reference).__name__}.")
    if {"rep", "metric", "mean"} <= set(reference.columns):
        table = reference.pivot_table(index="rep", columns="metric", values="mean", aggfunc="first")
    else:
        table = reference
    table = table.copy()
    table.index = [_rep_name(str(i)) for i in table.index]
    return table


def _text_color(cmap: Colormap, value: float) -> str:
    """Black on light cells, white on dark ones."""
    r, g, b, _ = cmap(min(max(value, 0.0), 1.0))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def metrics_heatmap(
    data: AnnData | pd.DataFrame,
    *,
    metrics: Sequence[str] = ("nmi", "ari", "homogeneity", "completeness"),
    key: str = "evaluate",
    reference: pd.DataFrame | None = None,
    ax: Axes | None = None,
    cmap: str | Colormap = "viridis",
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    r"""Heatmap of clustering metrics, models x metrics, each cell annotated mean ± std.

    The write-up's comparison table as a figure: one row per latent representation (labelled
    without the ``X_`` prefix, in the order of the summary), one column per metric; each cell
    reads ``"0.72\n±0.01"`` (mean ± standard deviation over seeds). The colour scale is fixed to
    [0, 1], so figures of different runs compare; values outside it take the end colours.

    Parameters
    ----------
    data
        An AnnData on which :func:`scvae_tools.tl.evaluate` ran (``uns[key]["summary"]`` is
        read), or that summary itself: a tidy DataFrame with columns ``rep``, ``metric``,
        ``mean`` and ``std``.
    metrics
        Metrics to show, in this order (default ``("nmi", "ari", "homogeneity",
        "completeness")``, the write-up's t-SNE + k-means protocol). ``"latent_nmi"``,
        ``"latent_ari"``, ``"knn_purity"`` and ``"silhouette"`` are there too.
    key
        ``uns`` key that evaluate wrote (its ``key_added``; default ``"evaluate"``).
    reference
        Published values to compare with, e.g. the write-up's table: a tidy DataFrame with
        ``rep``, ``metric`` and ``mean`` columns, or a wide one with reps as index and metrics as
        columns. Reps may be named with or without ``X_``. Each cell with a reference value
        gets a third line ``"(ref 0.70)"``. Default: none.
    ax
        Axes to draw into; default a new figure.
    cmap
        Colour map (default ``"viridis"``).
    show
        Show the figure; default ``sc.settings.autoshow``.
    save
        ``True`` writes ``sc.settings.figdir / "metrics_heatmap{plot_suffix}.{ext}"`` with
        ``ext = sc.settings.file_format_figs``; a string such as ``"_pbmc.png"`` is appended to
        the name and its extension sets the format. Default ``sc.settings.autosave``.

    Returns
    -------
    The heatmap's :class:`~matplotlib.axes.Axes` if the figure is not shown, else None. The colour
    bar is a second Axes of the same figure.

    Raises
    ------
    KeyError
        ``uns[key]`` is missing (run ``sv.tl.evaluate`` first), or a requested metric or a
        summary column is missing; the message lists what is there.
    """
    summary = _get_summary(data, key)
    metrics = _as_tuple(metrics, "metrics")
    present = list(dict.fromkeys(summary["metric"]))
    absent = [m for m in metrics if m not in present]
    if absent:
        raise KeyError(f"Metric(s) {absent} not in the summary; it has {present}.")
    summary = summary[summary["metric"].isin(metrics)]
    means = _wide(summary, "mean")[list(metrics)]
    stds = _wide(summary, "std")[list(metrics)]
    labels = [_rep_name(str(r)) for r in means.index]
    ref = _reference_table(reference) if reference is not None else None
    cmap = plt.get_cmap(cmap) if isinstance(cmap, str) else cmap

    if ax is None:
        n_rows, n_cols = means.shape
        fig, ax = plt.subplots(
            figsize=(1.3 * n_cols + 2.2, 0.75 * n_rows + 1.4), layout="constrained"
        )
    else:
        fig = ax.figure
    values = means.to_numpy()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.grid(False)  # scanpy's set_figure_params turns the grid on; it would cross the cells
    for i, label in enumerate(labels):
        for j, metric in enumerate(metrics):
            mean, std = values[i, j], stds.iloc[i, j]
            if not math.isfinite(mean):
                text, color = "n/a", "black"
            else:
                text = f"{mean:.2f}" + (f"\n±{std:.2f}" if math.isfinite(std) else "")
                color = _text_color(cmap, mean)
            if ref is not None and label in ref.index and metric in ref.columns:
                ref_value = float(ref.loc[label, metric])
                if math.isfinite(ref_value):
                    text += f"\n(ref {ref_value:.2f})"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize="small")
    ax.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics])
    ax.set_yticks(range(len(labels)), labels)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.colorbar(image, ax=ax, label="score", fraction=0.05, pad=0.03)
    shown = _savefig_or_show("metrics_heatmap", show=show, save=save, fig=fig)
    return None if shown else ax


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    if n <= 10:
        colors = plt.get_cmap("tab10").colors[:n]
    elif n <= 20:
        colors = plt.get_cmap("tab20").colors[:n]
    else:
        colors = plt.get_cmap("turbo")(np.linspace(0.05, 0.95, n))
    return [to_rgba(c) for c in colors]


def _categories(series: pd.Series) -> pd.Categorical:
    values = series.to_numpy() if not isinstance(series.dtype, pd.CategoricalDtype) else series
    return pd.Categorical(values)


def _colors_for(
    adata: AnnData, key: str, cats: pd.Categorical
) -> list[tuple[float, float, float, float]]:
    """Scanpy's ``uns[f"{key}_colors"]`` when it fits the categories, else a default palette."""
    stored = adata.uns.get(f"{key}_colors")
    n = len(cats.categories)
    if stored is not None and len(stored) >= n:
        try:
            return [to_rgba(c) for c in list(stored)[:n]]
        except ValueError:
            pass
    return _palette(n)


def _scatter_categories(
    ax: Axes,
    xy: np.ndarray,
    cats: pd.Categorical,
    colors: list[Any],
    *,
    size: float,
    title: str,
) -> None:
    codes = cats.codes
    point_colors = np.array([to_rgba(_NA_COLOR)] * len(codes))
    known = codes >= 0
    point_colors[known] = np.asarray(colors)[codes[known]]
    ax.scatter(
        xy[:, 0],
        xy[:, 1],
        c=point_colors,
        s=size,
        linewidths=0,
        rasterized=len(codes) > 5000,
    )
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=colors[i], label=str(cat))
        for i, cat in enumerate(cats.categories)
    ]
    ax.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
        fontsize="small",
        ncol=1 if len(handles) <= 14 else 2,
        handletextpad=0.2,
    )
    ax.set_title(title, fontsize="medium")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")


def _score_text(summary: pd.DataFrame | None, rep: str) -> str:
    if summary is None:
        return ""
    parts = []
    for metric in ("nmi", "ari"):
        rows = summary[(summary["rep"] == rep) & (summary["metric"] == metric)]
        if len(rows):
            mean, std = float(rows["mean"].iloc[0]), float(rows["std"].iloc[0])
            part = f"{metric.upper()} {mean:.2f}"
            parts.append(part + (f" ± {std:.2f}" if math.isfinite(std) else ""))
    return ", ".join(parts)


def tsne_kmeans(
    adata: AnnData,
    label_key: str,
    reps: str | Sequence[str] = ("X_ae", "X_vae", "X_vsc"),
    *,
    key: str = "evaluate",
    point_size: float | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Figure | None:
    """t-SNE of each latent coloured by the labels, beside the same t-SNE coloured by k-means.

    The write-up's comparison figure, from what :func:`scvae_tools.tl.evaluate` stored: one row
    per representation; left ``obsm["X_tsne_{name}"]`` coloured by ``obs[label_key]``, right the
    same embedding coloured by ``obs["kmeans_{name}"]`` (``name`` is the rep without ``X_``).
    The row title names the rep and, when ``uns[key]["summary"]`` has them, its NMI and ARI
    (mean ± std over seeds).

    Parameters
    ----------
    adata
        Annotated data matrix of shape ``(n_obs, n_vars)`` on which ``sv.tl.evaluate`` ran.
    label_key
        ``obs`` column of the reference labels (cell types), the one evaluate was given.
        Colours come from ``uns[f"{label_key}_colors"]`` when scanpy stored them.
    reps
        Representations, one row each, in this order (default ``("X_ae", "X_vae", "X_vsc")``).
    key
        ``uns`` key of evaluate's record, for the NMI/ARI in the row titles (default
        ``"evaluate"``); without it the titles carry only the rep names.
    point_size
        Marker area in points²; default ``min(120000 / n_obs, 40)``, scanpy's rule capped for
        small data.
    show
        Show the figure; default ``sc.settings.autoshow``.
    save
        ``True`` writes ``sc.settings.figdir / "tsne_kmeans{plot_suffix}.{file_format_figs}"``;
        a string such as ``"_pbmc.png"`` is appended to the name and its extension sets the
        format. Default ``sc.settings.autosave``.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (``2 * len(reps)`` Axes, row-major: labels then
    k-means of each rep) if it is not shown, else None.

    Raises
    ------
    KeyError
        ``label_key`` is not in ``obs``, or a rep's ``obsm["X_tsne_{name}"]`` or
        ``obs["kmeans_{name}"]`` is missing (run ``sv.tl.evaluate`` with that rep first).
    ValueError
        A t-SNE embedding is not of shape ``(n_obs, 2)``.
    """
    reps = _as_tuple(reps, "reps")
    obs_column(adata, label_key, argument="label_key", what="label")
    if point_size is None:
        point_size = min(120000 / max(adata.n_obs, 1), 40.0)
    names = [_rep_name(rep) for rep in reps]
    for rep, name in zip(reps, names, strict=True):
        tsne_key, km_key = f"X_tsne_{name}", f"kmeans_{name}"
        if tsne_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{tsne_key!r}] not found for rep {rep!r}: run "
                f"sv.tl.evaluate(adata, {label_key!r}, reps=[..., {rep!r}]) first. "
                f"obsm keys: {list(adata.obsm)}."
            )
        if km_key not in adata.obs:
            raise KeyError(
                f"adata.obs[{km_key!r}] not found for rep {rep!r}: run "
                f"sv.tl.evaluate(adata, {label_key!r}, reps=[..., {rep!r}]) first."
            )
        shape = np.shape(adata.obsm[tsne_key])
        if shape != (adata.n_obs, 2):
            raise ValueError(
                f"adata.obsm[{tsne_key!r}] has shape {shape}; a 2-D t-SNE of shape "
                f"({adata.n_obs}, 2) is expected. Rerun sv.tl.evaluate."
            )
    summary = None
    record = adata.uns.get(key)
    if isinstance(record, dict) and isinstance(record.get("summary"), pd.DataFrame):
        candidate = record["summary"]
        if set(_SUMMARY_COLUMNS) <= set(candidate.columns):
            summary = candidate

    labels = _categories(adata.obs[label_key])
    label_colors = _colors_for(adata, label_key, labels)
    fig = plt.figure(figsize=(10, 4.2 * len(reps)), layout="constrained")
    rows = fig.subfigures(len(reps), 1, squeeze=False)[:, 0]
    for row, rep, name in zip(rows, reps, names, strict=True):
        xy = np.asarray(adata.obsm[f"X_tsne_{name}"], dtype=np.float64)
        clusters = _categories(adata.obs[f"kmeans_{name}"])
        left, right = row.subplots(1, 2)
        _scatter_categories(
            left, xy, labels, label_colors, size=point_size, title=f"{name}: {label_key}"
        )
        _scatter_categories(
            right,
            xy,
            clusters,
            _palette(len(clusters.categories)),
            size=point_size,
            title=f"{name}: k-means",
        )
        scores = _score_text(summary, rep)
        row.suptitle(f"{name}" + (f" ({scores})" if scores else ""), fontweight="bold")
    shown = _savefig_or_show("tsne_kmeans", show=show, save=save, fig=fig)
    return None if shown else fig


def _history_series(history: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every one-dimensional numeric entry of a training history."""
    series = {}
    for name, values in history.items():
        if isinstance(values, str | bytes):
            continue
        arr = np.asarray(values)
        if arr.ndim == 1 and len(arr) and np.issubdtype(arr.dtype, np.number):
            series[name] = arr.astype(np.float64)
    return series


def loss_curves(
    adata: AnnData,
    keys: str | Sequence[str] = ("ae", "vae", "vsc"),
    *,
    terms: bool = True,
    logy: bool = False,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Figure | None:
    """Training loss per epoch of each model trained on ``adata``.

    One panel per key of ``keys`` present in ``adata.uns`` (those absent are skipped): the total
    ``loss`` of ``uns[key]["history"]`` per epoch, bold, and with ``terms=True`` every other
    per-epoch entry of the history (``reconstruction``, ``kl``, and for the VSC ``kl_slab``
    and ``kl_spike``). The values are averages over cells, as :func:`scvae_tools.tl.vae`
    records them; the total is ``reconstruction + beta * kl``.

    Parameters
    ----------
    adata
        Annotated data matrix on which ``sv.tl.ae``, ``vae`` and/or ``vsc`` ran.
    keys
        ``uns`` keys of the models (their ``key_added``), one panel each, in this order (default
        ``("ae", "vae", "vsc")``).
    terms
        Also draw the loss terms (default True).
    logy
        Logarithmic y axis (default False); non-positive values are not drawn.
    show
        Show the figure; default ``sc.settings.autoshow``.
    save
        ``True`` writes ``sc.settings.figdir / "loss_curves{plot_suffix}.{file_format_figs}"``;
        a string such as ``"_pbmc.png"`` is appended to the name and its extension sets the
        format. Default ``sc.settings.autosave``.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`, one Axes per model found, if it is not shown, else
    None.

    Raises
    ------
    KeyError
        None of ``keys`` is in ``adata.uns`` (train with ``sv.tl.ae``/``vae``/``vsc`` first), or
        a record has no ``history`` with a ``loss``.
    """
    keys = _as_tuple(keys, "keys")
    found = [k for k in keys if k in adata.uns]
    if not found:
        raise KeyError(
            f"None of {list(keys)} is in adata.uns: train a model first (sv.tl.ae, sv.tl.vae, "
            f"sv.tl.vsc), or pass keys= its key_added. uns keys: {sorted(adata.uns)}."
        )
    histories = {}
    for k in found:
        record = adata.uns[k]
        history = record.get("history") if isinstance(record, dict) else None
        series = _history_series(history) if isinstance(history, dict) else {}
        if "loss" not in series:
            raise KeyError(
                f"adata.uns[{k!r}] has no training history with a 'loss' entry: it was not "
                "written by sv.tl.ae/vae/vsc. Pass keys= only the models' keys."
            )
        histories[k] = (record, series)

    fig, axes = plt.subplots(
        1, len(found), figsize=(4.2 * len(found), 3.4), squeeze=False, layout="constrained"
    )
    for ax, (k, (record, series)) in zip(axes[0], histories.items(), strict=True):
        epochs = np.arange(1, len(series["loss"]) + 1)
        ax.plot(epochs, series["loss"], color="black", linewidth=2, label="loss")
        if terms:
            for name, values in series.items():
                if name != "loss":
                    ax.plot(np.arange(1, len(values) + 1), values, linewidth=1.2, label=name)
        if logy:
            ax.set_yscale("log")
        params = record.get("params", {})
        title = k
        if isinstance(params, dict) and "beta" in params:
            title += f" (β={float(params['beta']):g})"
        seconds = record.get("training_time_s")
        if isinstance(seconds, numbers.Real):
            title += f", {float(seconds):.1f} s"
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss per cell")
        ax.legend(fontsize="small", frameon=False)
    shown = _savefig_or_show("loss_curves", show=show, save=save, fig=fig)
    return None if shown else fig


def spike_probabilities(
    adata: AnnData,
    key: str = "X_vsc_spike",
    *,
    groupby: str | None = None,
    threshold: float = 0.5,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Figure | None:
    """How sparse the β-VSC codes are: spike probabilities per dimension, per cell, per group.

    Panel 1: box plots of the spike probability (probability that a latent dimension is active)
    of every cell, one box per latent dimension (column of ``obsm[key]``, 0-based), the means
    marked, ``threshold`` dashed. Panel 2: histogram of the number of active dimensions per cell
    (spike probability > ``threshold``). Panel 3, with ``groupby``: heatmap of the mean spike
    probability per group x dimension.

    Parameters
    ----------
    adata
        Annotated data matrix on which :func:`scvae_tools.tl.vsc` ran.
    key
        ``obsm`` key of the spike probabilities, ``(n_obs, n_latent)`` in [0, 1] (default
        ``"X_vsc_spike"``; ``key_added + "_spike"`` if the VSC was run with ``key_added``).
    groupby
        ``obs`` column (e.g. cell types or clusters) for the per-group heatmap; default none.
    threshold
        A dimension counts as active in a cell when its spike probability exceeds this, in
        [0, 1] (default 0.5).
    show
        Show the figure; default ``sc.settings.autoshow``.
    save
        ``True`` writes ``sc.settings.figdir / "spike_probabilities{plot_suffix}.{ext}"`` with
        ``ext = sc.settings.file_format_figs``; a string such as ``"_pbmc.png"`` is appended to
        the name and its extension sets the format. Default ``sc.settings.autosave``.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` if it is not shown, else None: 2 Axes, or 4 with
    ``groupby`` (the heatmap and its colour bar).

    Raises
    ------
    KeyError
        ``obsm[key]`` or the ``groupby`` column is missing.
    ValueError
        ``obsm[key]`` is not a 2-D matrix of probabilities in [0, 1], or ``threshold`` is not in
        [0, 1].
    """
    if key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{key!r}] not found: run sv.tl.vsc(adata) first (with key_added=, the key "
            f"is key_added + '_spike'). obsm keys: {list(adata.obsm)}."
        )
    if groupby is not None:
        obs_column(adata, groupby, argument="groupby", what="group", allow_missing=True)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"`threshold` must be a number in [0, 1], got {threshold!r}.")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"`threshold` must lie in [0, 1], got {threshold!r}.")
    spike = adata.obsm[key]
    spike = np.asarray(spike.toarray() if hasattr(spike, "toarray") else spike, dtype=np.float64)
    if spike.ndim != 2 or spike.shape[0] != adata.n_obs or spike.shape[1] == 0:
        raise ValueError(
            f"adata.obsm[{key!r}] has shape {spike.shape}; spike probabilities of shape "
            f"(n_obs, n_latent) = ({adata.n_obs}, n_latent) are expected."
        )
    if not np.isfinite(spike).all() or spike.min() < 0.0 or spike.max() > 1.0:
        raise ValueError(
            f"adata.obsm[{key!r}] holds values outside [0, 1] (or NaN); it should be the VSC's "
            "spike probabilities (e.g. 'X_vsc_spike'), not its latent code ('X_vsc')."
        )
    n_latent = spike.shape[1]
    dims = np.arange(n_latent)
    active = (spike > threshold).sum(axis=1)

    n_panels = 3 if groupby is not None else 2
    fig, axes = plt.subplots(
        1, n_panels, figsize=(5.2 * n_panels, 3.8), squeeze=False, layout="constrained"
    )
    ax_box, ax_hist = axes[0, 0], axes[0, 1]
    ax_box.boxplot(
        [spike[:, j] for j in dims],
        positions=dims,
        showmeans=True,
        showfliers=False,
        widths=0.6,
        meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black"},
    )
    ax_box.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
    ax_box.set_xticks(dims, [str(j) for j in dims])
    ax_box.set_ylim(-0.03, 1.03)
    ax_box.set_xlabel("latent dimension")
    ax_box.set_ylabel("spike probability")
    ax_box.set_title("Spike probability\nper dimension", fontsize="medium")

    ax_hist.hist(active, bins=np.arange(n_latent + 2) - 0.5, color="tab:blue", rwidth=0.85)
    ax_hist.set_xticks(np.arange(n_latent + 1))
    ax_hist.set_xlabel(f"active dimensions (spike probability > {float(threshold):g})")
    ax_hist.set_ylabel("cells")
    ax_hist.set_title(f"Active dimensions per cell\n(mean {active.mean():.2f})", fontsize="medium")

    if groupby is not None:
        ax_heat = axes[0, 2]
        groups = _categories(adata.obs[groupby])
        frame = pd.DataFrame(spike, columns=dims)
        frame["_group"] = groups
        means = frame.groupby("_group", observed=True).mean()
        image = ax_heat.imshow(means.to_numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax_heat.grid(False)
        ax_heat.set_xticks(dims, [str(j) for j in dims])
        ax_heat.set_yticks(range(len(means)), [str(g) for g in means.index])
        ax_heat.set_xlabel("latent dimension")
        ax_heat.set_title(f"Mean spike probability\nper {groupby}", fontsize="medium")
        fig.colorbar(image, ax=ax_heat, label="mean spike probability")
    shown = _savefig_or_show("spike_probabilities", show=show, save=save, fig=fig)
    return None if shown else fig


def _scib_table(data: AnnData | pd.DataFrame, key: str) -> pd.DataFrame:
    """The scIB scores as reps x metrics (our metric names), from evaluate or a DataFrame."""
    from ..tl._integration import METRIC_NAMES, SCIB_METRICS

    if isinstance(data, AnnData):
        record = data.uns.get(key)
        if not isinstance(record, dict) or "scib" not in record:
            raise KeyError(
                f"adata.uns[{key!r}] holds no integration scores: run "
                "sv.tl.evaluate(adata, label_key, batch_key=...) first (or pass key= if it "
                f"was run with key_added=). uns keys: {sorted(data.uns)}."
            )
        table = record["scib"]
        if not isinstance(table, pd.DataFrame):
            table = pd.DataFrame(table)
    elif isinstance(data, pd.DataFrame):
        table = data
    else:
        raise TypeError(
            "`data` must be an AnnData on which sv.tl.evaluate ran with batch_key, or a "
            f"DataFrame of scores (methods x metrics), got {type(data).__name__}."
        )
    # scib-metrics' Benchmarker names ("iLISI", "Total") are accepted too, and its
    # "Metric Type" row is dropped.
    by_display = {v: k for k, v in METRIC_NAMES.items()}
    table = table.rename(columns=by_display)
    table = table.loc[[i for i in table.index if str(i) != "Metric Type"]]
    metrics = [m for m in SCIB_METRICS if m in table.columns]
    if not metrics:
        raise KeyError(
            f"The table has none of the scIB metrics {list(SCIB_METRICS)}; its columns are "
            f"{list(table.columns)}."
        )
    if table.empty:
        raise ValueError("The table of integration scores has no rows.")
    return table[metrics].astype(float)


def integration_scores(
    data: AnnData | pd.DataFrame,
    *,
    key: str = "evaluate",
    sort: bool = True,
    cmap: str | Colormap = "viridis",
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """The scIB integration scores as a table: methods x metrics, with the totals as bars.

    The figure of scIB (Luecken et al. 2022) and of scib-metrics' ``Benchmarker``: one row
    per representation (labelled without the ``X_`` prefix), best ``total`` on top; the bio
    conservation metrics, then the batch correction metrics as coloured cells with their
    values, then the three totals (``bio_conservation``, ``batch_correction``, ``total`` =
    0.6 bio + 0.4 batch) as bars whose length is the score. The colour scale is fixed to
    [0, 1], so figures of different runs compare.

    Parameters
    ----------
    data
        An AnnData on which :func:`scvae_tools.tl.evaluate` ran with ``batch_key``
        (``uns[key]["scib"]`` is read), or a DataFrame of scores with one row per method and
        one column per metric: evaluate's names (``"ilisi"``, ``"total"``) or scib-metrics'
        (``"iLISI"``, ``"Total"``; the output of ``Benchmarker.get_results()`` works as it is).
        Metrics that are missing are left out.
    key
        ``uns`` key that evaluate wrote (its ``key_added``; default ``"evaluate"``).
    sort
        Order the rows by ``total``, best first (default True); False keeps the table's order.
    cmap
        Colour map of the cells and bars (default ``"viridis"``).
    ax
        Axes to draw into; default a new figure.
    show
        Show the figure; default ``sc.settings.autoshow``.
    save
        ``True`` writes ``sc.settings.figdir / "integration_scores{plot_suffix}.{ext}"`` with
        ``ext = sc.settings.file_format_figs``; a string such as ``"_pbmc.png"`` is appended to
        the name and its extension sets the format. Default ``sc.settings.autosave``.

    Returns
    -------
    The table's :class:`~matplotlib.axes.Axes` if the figure is not shown, else None.

    Raises
    ------
    KeyError
        ``uns[key]`` holds no integration scores (run ``sv.tl.evaluate`` with ``batch_key``
        first), or the DataFrame has none of the metrics.
    """
    from ..tl._integration import AGGREGATES, BATCH_METRICS, BIO_METRICS, METRIC_NAMES

    table = _scib_table(data, key)
    if sort and "total" in table.columns:
        table = table.sort_values("total", ascending=False, kind="stable")
    cmap = plt.get_cmap(cmap) if isinstance(cmap, str) else cmap
    metrics = list(table.columns)
    cells = [m for m in metrics if m not in AGGREGATES]
    bars = [m for m in metrics if m in AGGREGATES]
    n_rows, n_cols = len(table), len(metrics)
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.95 * n_cols + 2.0, 0.42 * n_rows + 1.6))
    else:
        fig = ax.figure
    values = table.to_numpy()
    ax.imshow(
        np.ma.masked_invalid(values[:, : len(cells)]) if cells else np.zeros((n_rows, 0)),
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        extent=(-0.5, len(cells) - 0.5, n_rows - 0.5, -0.5),
    )
    ax.grid(False)
    for i in range(n_rows):
        for j, metric in enumerate(metrics):
            value = values[i, j]
            finite = math.isfinite(value)
            if metric in AGGREGATES:
                if finite:
                    width = 0.9 * min(max(value, 0.0), 1.0)
                    ax.add_patch(
                        plt.Rectangle(
                            (j - 0.45, i - 0.35), width, 0.7, color=cmap(value), linewidth=0
                        )
                    )
                # Inside a long bar, after a short one (where it would not fit).
                inside = finite and value >= 0.5
                x_text = j - 0.4 if inside or not finite else j - 0.43 + 0.9 * max(value, 0.0)
                ax.text(
                    x_text,
                    i,
                    f"{value:.2f}" if finite else "n/a",
                    ha="left",
                    va="center",
                    fontsize="small",
                    color=_text_color(cmap, value) if inside else "black",
                )
            else:
                color = _text_color(cmap, value) if finite else "black"
                text = f"{value:.2f}" if finite else "n/a"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize="small")
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_xticks(
        range(n_cols),
        [METRIC_NAMES[m].replace(" ", "\n", 1) for m in metrics],
        rotation=0,
        fontsize="small",
    )
    ax.xaxis.tick_top()
    ax.set_yticks(range(n_rows), [_rep_name(str(r)) for r in table.index])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    groups = [
        ("Bio conservation", [m for m in metrics if m in BIO_METRICS]),
        ("Batch correction", [m for m in metrics if m in BATCH_METRICS]),
        ("Aggregate score", bars),
    ]
    start = 0
    for title, members in groups:
        if not members:
            continue
        stop = start + len(members)
        if start > 0:
            ax.axvline(start - 0.5, color="black", linewidth=1)
        ax.annotate(
            title,
            xy=((start + stop - 1) / 2, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, 34),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontweight="bold",
        )
        start = stop
    fig.tight_layout()
    shown = _savefig_or_show("integration_scores", show=show, save=save, fig=fig)
    return None if shown else ax


def gene_programs(
    adata: AnnData,
    key: str = "vsc_programs",
    *,
    dims: Sequence[int] | None = None,
    n_top: int = 5,
    ax: Axes | None = None,
    cmap: str | Colormap = "RdBu_r",
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Heatmap of the genes each latent dimension moves: top genes x dimensions.

    Rows: the ``n_top`` genes with the largest absolute loading on each dimension shown, in the
    order of the dimensions (a gene top for several appears once, under the first); columns:
    the dimensions, each labelled with its share of active cells (``uns[key]["active_share"]``;
    omitted for the AE). Colours: the loadings of ``varm[key]``, on a scale symmetric about 0.

    Parameters
    ----------
    adata
        Annotated data matrix on which :func:`scvae_tools.tl.gene_programs` ran.
    key
        Its ``key_added`` (default ``"vsc_programs"``; ``"{kind}_programs"`` by default there).
    dims
        Latent dimensions to show, in this order (default all).
    n_top
        Genes per dimension (default 5); at most the ``n_top`` the tool listed.
    ax
        Axes to draw into; default a new figure.
    cmap
        Diverging colour map of the loadings (default ``"RdBu_r"``).
    show
        Show the figure; default ``sc.settings.autoshow``.
    save
        ``True`` writes ``sc.settings.figdir / "gene_programs{plot_suffix}.{ext}"``; a string
        such as ``"_pbmc.png"`` is appended to the name and its extension sets the format.
        Default ``sc.settings.autosave``.

    Returns
    -------
    The heatmap's :class:`~matplotlib.axes.Axes` if the figure is not shown, else None.

    Raises
    ------
    KeyError
        ``varm[key]`` or ``uns[key]`` is missing.
    ValueError
        A dimension out of range, or ``n_top`` not a positive integer.
    """
    if key not in adata.varm or key not in adata.uns:
        raise KeyError(
            f"adata.varm[{key!r}] / adata.uns[{key!r}] not found: run "
            "sv.tl.gene_programs(adata, model) first (the key is '{kind}_programs' or its "
            f"key_added). varm keys: {list(adata.varm)}."
        )
    loadings = np.asarray(adata.varm[key], dtype=np.float64)
    record = adata.uns[key]
    top = record["top_genes"]
    top = top if isinstance(top, pd.DataFrame) else pd.DataFrame(top)
    n_latent = loadings.shape[1]
    dims = list(range(n_latent)) if dims is None else [int(d) for d in dims]
    if not dims or any(not 0 <= d < n_latent for d in dims):
        raise ValueError(f"`dims` must be latent dimensions in 0..{n_latent - 1}, got {dims}.")
    if isinstance(n_top, bool) or not isinstance(n_top, numbers.Integral) or n_top < 1:
        raise ValueError(f"`n_top` must be a positive integer, got {n_top!r}.")
    genes = list(dict.fromkeys(g for d in dims for g in list(top[str(d)])[:n_top]))
    rows = adata.var_names.get_indexer(genes)
    values = loadings[np.ix_(rows, dims)]
    share = np.asarray(record.get("active_share", np.full(n_latent, np.nan)), dtype=float)

    if ax is None:
        fig, ax = plt.subplots(
            figsize=(1.0 + 0.7 * len(dims), 1.2 + 0.22 * len(genes)), layout="constrained"
        )
    else:
        fig = ax.figure
    limit = float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    ax.grid(False)
    labels = [
        f"{d}" if not np.isfinite(share[d]) else f"{d}\n{100 * share[d]:.0f}% active" for d in dims
    ]
    # Upright labels collide beyond a few dimensions (two lines each: index, share active).
    rotation = 0 if len(dims) <= 5 else 90
    ax.set_xticks(range(len(dims)), labels, fontsize="small", rotation=rotation)
    ax.set_yticks(range(len(genes)), genes, fontsize="small")
    ax.set_xlabel("latent dimension")
    ax.set_title(f"Gene programs ({key})", fontsize="medium")
    fig.colorbar(image, ax=ax, label="loading")
    shown = _savefig_or_show("gene_programs", show=show, save=save, fig=fig)
    return None if shown else ax
