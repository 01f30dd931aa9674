"""sv.pl: the figures, scanpy's show=/save= convention and the error messages."""

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

import scvae_tools as sv
from scvae_tools.pl._utils import _savefig_or_show
from scvae_tools.tl._integration import SCIB_METRICS

REPS = ("X_ae", "X_vae", "X_vsc")
METRICS = (
    "nmi",
    "ari",
    "homogeneity",
    "completeness",
    "latent_nmi",
    "latent_ari",
    "knn_purity",
    "silhouette",
)
N_OBS, N_LATENT = 90, 5


def _summary(rng):
    rows = [
        {
            "rep": rep,
            "metric": metric,
            "mean": float(rng.uniform(0.1, 0.95)),
            "std": float(rng.uniform(0.0, 0.05)),
            "n_seeds": 3,
        }
        for rep in REPS
        for metric in METRICS
    ]
    return pd.DataFrame(rows)


def _scib(rng, reps=(*REPS, "pca5", "pca10")):
    table = pd.DataFrame(
        rng.uniform(0.05, 0.95, (len(reps), 10)), index=list(reps), columns=SCIB_METRICS[:10]
    )
    table["bio_conservation"] = table.iloc[:, :5].mean(1)
    table["batch_correction"] = table.iloc[:, 5:].mean(1)
    table["total"] = 0.6 * table["bio_conservation"] + 0.4 * table["batch_correction"]
    table.index.name = "rep"
    return table


def _history(rng, n_epochs, names, as_list=False):
    hist = {name: np.sort(rng.uniform(1, 50, n_epochs))[::-1].copy() for name in names}
    hist["loss"] = sum(hist.values()) + 1.0
    return {k: v.tolist() for k, v in hist.items()} if as_list else hist


@pytest.fixture
def adata():
    """What sv.tl.ae/vae/vsc and sv.tl.evaluate write, built by hand."""
    rng = np.random.default_rng(0)
    types = np.repeat(["B", "NK", "T"], N_OBS // 3)
    a = ad.AnnData(rng.normal(size=(N_OBS, 12)).astype(np.float32))
    a.obs["cell_type"] = pd.Categorical(types)
    for rep in REPS:
        name = rep[2:]
        a.obsm[rep] = rng.normal(size=(N_OBS, N_LATENT)).astype(np.float32)
        a.obsm[f"X_tsne_{name}"] = rng.normal(size=(N_OBS, 2)).astype(np.float32)
        a.obs[f"kmeans_{name}"] = pd.Categorical(rng.integers(0, 3, N_OBS).astype(str))
    spike = rng.uniform(0, 1, (N_OBS, N_LATENT))
    spike[:, 0] = 0.0  # a dead dimension: constant columns must not break the box plots
    a.obsm["X_vsc_spike"] = spike.astype(np.float32)
    a.uns["evaluate"] = {
        "summary": _summary(rng),
        "params": {"label_key": "cell_type", "reps": list(REPS), "n_seeds": 3, "perplexity": 30},
        "scib": _scib(rng),
    }
    a.uns["ae"] = {"params": {"model": "ae"}, "history": _history(rng, 7, ["reconstruction"])}
    a.uns["vae"] = {
        "params": {"model": "vae", "beta": 2.0},
        "history": _history(rng, 7, ["reconstruction", "kl"], as_list=True),  # as read from h5ad
        "training_time_s": 1.5,
    }
    a.uns["vsc"] = {
        "params": {"model": "vsc", "beta": 2.0},
        "history": _history(rng, 7, ["reconstruction", "kl", "kl_slab", "kl_spike"]),
        "training_time_s": 2.5,
    }
    return a


@pytest.fixture(autouse=True)
def _settings(tmp_path):
    # sc.settings is a class with metaclass properties, which monkeypatch cannot undo: restore by
    # hand.
    names = ("figdir", "autoshow", "autosave", "file_format_figs", "plot_suffix")
    saved = {name: getattr(sc.settings, name) for name in names}
    sc.settings.figdir = tmp_path / "figures"
    sc.settings.autoshow = False
    sc.settings.autosave = False
    sc.settings.file_format_figs = "pdf"
    sc.settings.plot_suffix = ""
    yield
    plt.close("all")
    for name, value in saved.items():
        setattr(sc.settings, name, value)


def _assert_same(x, y, path="adata"):
    """Deep equality of the values an AnnData holds (arrays, frames, dicts, lists)."""
    if isinstance(x, pd.DataFrame):
        pd.testing.assert_frame_equal(x, y, obj=path)
    elif isinstance(x, dict):
        assert set(x) == set(y), path
        for k in x:
            _assert_same(x[k], y[k], f"{path}[{k!r}]")
    elif isinstance(x, np.ndarray | list):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
        assert type(x) is type(y), path
    else:
        assert x == y, path


def _assert_unchanged(adata, before):
    np.testing.assert_array_equal(adata.X, before.X)
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    _assert_same(dict(adata.obsm), dict(before.obsm), "obsm")
    _assert_same(dict(adata.uns), dict(before.uns), "uns")


def _texts(ax):
    return [t.get_text() for t in ax.texts]


# metrics_heatmap -------------------------------------------------------------------------------


def test_metrics_heatmap_annotates_mean_and_std(adata):
    ax = sv.pl.metrics_heatmap(adata, show=False)
    assert isinstance(ax, Axes)
    assert len(ax.figure.axes) == 2  # heatmap + colour bar
    summary = adata.uns["evaluate"]["summary"].set_index(["rep", "metric"])
    metrics = ("nmi", "ari", "homogeneity", "completeness")
    expected = [
        f"{summary.loc[(rep, m), 'mean']:.2f}\n±{summary.loc[(rep, m), 'std']:.2f}"
        for rep in REPS
        for m in metrics
    ]
    assert _texts(ax) == expected
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ae", "vae", "vsc"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(metrics)
    image = ax.images[0]
    assert image.get_clim() == (0.0, 1.0)
    np.testing.assert_allclose(
        np.asarray(image.get_array())[2], [summary.loc[("X_vsc", m), "mean"] for m in metrics]
    )


def test_metrics_heatmap_from_dataframe_with_reference_and_ax():
    summary = pd.DataFrame(
        {
            "rep": ["X_ae", "X_ae", "X_vsc", "X_vsc"],
            "metric": ["knn_purity", "latent_nmi"] * 2,
            "mean": [0.724, 0.5, 0.91, 0.333],
            "std": [0.012, 0.0, 0.02, np.nan],
            "n_seeds": [3, 3, 3, 1],
        }
    )
    reference = pd.DataFrame({"latent_nmi": [0.7]}, index=["vsc"])
    _, ax = plt.subplots()
    out = sv.pl.metrics_heatmap(
        summary, metrics=["latent_nmi", "knn_purity"], reference=reference, ax=ax, show=False
    )
    assert out is ax
    # NaN std (one seed) shows the mean alone; the reference adds a third line where known.
    assert _texts(ax) == ["0.50\n±0.00", "0.72\n±0.01", "0.33\n(ref 0.70)", "0.91\n±0.02"]


def test_metrics_heatmap_errors_say_what_to_do(adata):
    bare = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(KeyError, match=r"uns\['evaluate'\] not found: run sv.tl.evaluate"):
        sv.pl.metrics_heatmap(bare)
    with pytest.raises(KeyError, match=r"\['f1'\] not in the summary; it has \['nmi', 'ari'"):
        sv.pl.metrics_heatmap(adata, metrics=("nmi", "f1"))
    with pytest.raises(KeyError, match=r"lacks the column\(s\) \['std'\]"):
        sv.pl.metrics_heatmap(adata.uns["evaluate"]["summary"].drop(columns="std"))
    with pytest.raises(TypeError, match="AnnData or the summary DataFrame"):
        sv.pl.metrics_heatmap({"summary": 1})
    assert plt.get_fignums() == []  # no half-drawn figure left behind


# tsne_kmeans -----------------------------------------------------------------------------------


def test_tsne_kmeans_rows_colours_and_titles(adata):
    fig = sv.pl.tsne_kmeans(adata, "cell_type", show=False)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6
    summary = adata.uns["evaluate"]["summary"].set_index(["rep", "metric"])
    titles = [sub.get_suptitle() for sub in fig.subfigs]
    nmi, ari = summary.loc[("X_vae", "nmi")], summary.loc[("X_vae", "ari")]
    assert titles[1] == (
        f"vae (NMI {nmi['mean']:.2f} ± {nmi['std']:.2f}, ARI {ari['mean']:.2f} ± {ari['std']:.2f})"
    )
    left, right = fig.axes[4], fig.axes[5]  # the vsc row
    np.testing.assert_allclose(left.collections[0].get_offsets(), adata.obsm["X_tsne_vsc"])
    legend = [t.get_text() for t in left.get_legend().get_texts()]
    assert legend == ["B", "NK", "T"]
    colors = left.collections[0].get_facecolors()
    palette = [to_rgba(c) for c in plt.get_cmap("tab10").colors[:3]]
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    np.testing.assert_allclose(colors, np.asarray(palette)[codes])
    kmeans = sorted(t.get_text() for t in right.get_legend().get_texts())
    assert kmeans == sorted(adata.obs["kmeans_vsc"].cat.categories)


def test_tsne_kmeans_one_rep_uses_scanpy_colours_without_summary(adata):
    adata.uns["cell_type_colors"] = ["#ff0000", "#00ff00", "#0000ff"]
    del adata.uns["evaluate"]
    fig = sv.pl.tsne_kmeans(adata, "cell_type", reps="X_vsc", point_size=3, show=False)
    assert len(fig.axes) == 2
    assert fig.subfigs[0].get_suptitle() == "vsc"
    scatter = fig.axes[0].collections[0]
    np.testing.assert_allclose(scatter.get_facecolors()[0], to_rgba("#ff0000"))
    np.testing.assert_allclose(scatter.get_sizes(), [3])


def test_tsne_kmeans_errors_say_what_to_do(adata):
    del adata.obsm["X_tsne_vae"]
    with pytest.raises(KeyError, match=r"obsm\['X_tsne_vae'\] not found .*run sv.tl.evaluate"):
        sv.pl.tsne_kmeans(adata, "cell_type")
    no_kmeans = adata.copy()
    del no_kmeans.obs["kmeans_ae"]
    with pytest.raises(KeyError, match=r"obs\['kmeans_ae'\] not found .*run sv.tl.evaluate"):
        sv.pl.tsne_kmeans(no_kmeans, "cell_type", reps=["X_ae"])
    with pytest.raises(KeyError, match=r"label_key='celltype' is not a column of adata.obs"):
        sv.pl.tsne_kmeans(adata, "celltype", reps=["X_ae"])
    assert plt.get_fignums() == []


# loss_curves -----------------------------------------------------------------------------------


def test_loss_curves_one_panel_per_model_with_terms(adata):
    fig = sv.pl.loss_curves(adata, show=False)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3
    labels = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
    assert labels == [
        ["loss", "reconstruction"],
        ["loss", "reconstruction", "kl"],
        ["loss", "reconstruction", "kl", "kl_slab", "kl_spike"],
    ]
    loss = fig.axes[1].get_lines()[0]
    np.testing.assert_array_equal(loss.get_xdata(), np.arange(1, 8))
    np.testing.assert_allclose(loss.get_ydata(), adata.uns["vae"]["history"]["loss"])
    assert fig.axes[2].get_title() == "vsc (β=2), 2.5 s"


def test_loss_curves_skips_absent_models_and_can_hide_terms(adata):
    del adata.uns["vae"]
    fig = sv.pl.loss_curves(adata, terms=False, logy=True, show=False)
    assert len(fig.axes) == 2
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1]
    assert all(ax.get_yscale() == "log" for ax in fig.axes)


def test_loss_curves_errors(adata):
    with pytest.raises(KeyError, match=r"None of \['foo'\] is in adata.uns.*uns keys: \['ae'"):
        sv.pl.loss_curves(adata, keys="foo")
    with pytest.raises(KeyError, match=r"uns\['evaluate'\] has no training history"):
        sv.pl.loss_curves(adata, keys=["ae", "evaluate"])
    assert plt.get_fignums() == []


# spike_probabilities ---------------------------------------------------------------------------


def test_spike_probabilities_panels(adata):
    fig = sv.pl.spike_probabilities(adata, threshold=0.6, show=False)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    spike = adata.obsm["X_vsc_spike"]
    active = (spike > 0.6).sum(1)
    heights = [patch.get_height() for patch in fig.axes[1].patches]
    np.testing.assert_array_equal(heights, np.bincount(active, minlength=N_LATENT + 1))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [
        str(j) for j in range(N_LATENT)
    ]


def test_spike_probabilities_groupby_heatmap(adata):
    fig = sv.pl.spike_probabilities(adata, groupby="cell_type", show=False)
    assert len(fig.axes) == 4  # box plots, histogram, heatmap, colour bar
    heat = fig.axes[2]
    expected = (
        pd.DataFrame(adata.obsm["X_vsc_spike"]).groupby(adata.obs["cell_type"].to_numpy()).mean()
    )
    np.testing.assert_allclose(np.asarray(heat.images[0].get_array()), expected, rtol=1e-6)
    assert [t.get_text() for t in heat.get_yticklabels()] == ["B", "NK", "T"]


def test_spike_probabilities_errors(adata):
    with pytest.raises(KeyError, match=r"obsm\['X_spike'\] not found: run sv.tl.vsc"):
        sv.pl.spike_probabilities(adata, "X_spike")
    with pytest.raises(KeyError, match=r"groupby='type' is not a column.*'cell_type'"):
        sv.pl.spike_probabilities(adata, groupby="type")
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*not its latent code"):
        sv.pl.spike_probabilities(adata, "X_vsc")
    with pytest.raises(ValueError, match=r"`threshold` must lie in \[0, 1\]"):
        sv.pl.spike_probabilities(adata, threshold=1.5)
    assert plt.get_fignums() == []


# integration_scores ----------------------------------------------------------------------------


def test_integration_scores_rows_by_total_cells_and_bars(adata):
    ax = sv.pl.integration_scores(adata, show=False)
    assert isinstance(ax, Axes)
    table = adata.uns["evaluate"]["scib"].sort_values("total", ascending=False)
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows == [r.removeprefix("X_") for r in table.index]
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["Isolated\nlabels", "KMeans\nNMI"]
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "Total"
    # The ten metrics are coloured cells on [0, 1], in scIB's order.
    image = ax.images[0]
    assert image.get_clim() == (0.0, 1.0)
    np.testing.assert_allclose(np.asarray(image.get_array()), table.iloc[:, :10].to_numpy())
    # The three totals are bars as long as the score (0.9 of a cell for 1.0), each labelled.
    widths = [p.get_width() for p in ax.patches]
    np.testing.assert_allclose(widths, 0.9 * table.iloc[:, 10:].to_numpy().ravel())
    texts = _texts(ax)
    best = table.iloc[0]
    assert texts[: len(best)] == [f"{v:.2f}" for v in best]
    assert {"Bio conservation", "Batch correction", "Aggregate score"} <= set(texts)


def test_integration_scores_from_a_benchmarker_table_keeps_order_and_shows_gaps():
    rng = np.random.default_rng(1)
    table = _scib(rng, reps=("X_scvi", "X_harmony"))[["ilisi", "kbet", "total"]]
    table.loc["X_harmony", "kbet"] = np.nan
    # scib-metrics' Benchmarker.get_results(): display names and a "Metric Type" row.
    bench = table.rename(columns={"ilisi": "iLISI", "kbet": "KBET", "total": "Total"}).astype(
        object
    )
    bench.loc["Metric Type"] = ["Batch correction", "Batch correction", "Aggregate score"]
    _, ax = plt.subplots()
    out = sv.pl.integration_scores(bench, sort=False, ax=ax, show=False)
    assert out is ax
    assert [t.get_text() for t in ax.get_yticklabels()] == ["scvi", "harmony"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["iLISI", "KBET", "Total"]
    texts = _texts(ax)
    assert "n/a" in texts and "Bio conservation" not in texts
    assert texts[:3] == [f"{v:.2f}" for v in table.loc["X_scvi"]]


def test_integration_scores_errors_say_what_to_do(adata):
    del adata.uns["evaluate"]["scib"]
    with pytest.raises(KeyError, match=r"no integration scores: run sv.tl.evaluate\(adata, "):
        sv.pl.integration_scores(adata)
    with pytest.raises(KeyError, match="none of the scIB metrics"):
        sv.pl.integration_scores(pd.DataFrame({"nmi": [0.5]}, index=["X_ae"]))
    with pytest.raises(TypeError, match=r"AnnData on which sv\.tl\.evaluate ran with batch_key"):
        sv.pl.integration_scores({"scib": 1})
    assert plt.get_fignums() == []


# show= / save= and the AnnData -----------------------------------------------------------------

CALLS = {
    "metrics_heatmap": lambda a, **kw: sv.pl.metrics_heatmap(a, **kw),
    "integration_scores": lambda a, **kw: sv.pl.integration_scores(a, **kw),
    "tsne_kmeans": lambda a, **kw: sv.pl.tsne_kmeans(a, "cell_type", **kw),
    "loss_curves": lambda a, **kw: sv.pl.loss_curves(a, **kw),
    "spike_probabilities": lambda a, **kw: sv.pl.spike_probabilities(a, groupby="cell_type", **kw),
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", CALLS)
def test_save_writes_at_scanpys_path_and_leaves_adata_unchanged(adata, name):
    before = adata.copy()
    sc.settings.file_format_figs = "png"
    sc.settings.plot_suffix = "_v1"
    out = CALLS[name](adata, save=True, show=False)
    path = sc.settings.figdir / f"{name}_v1.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert isinstance(out, Axes if name in ("metrics_heatmap", "integration_scores") else Figure)
    _assert_unchanged(adata, before)


@pytest.mark.parametrize("name", CALLS)
def test_save_string_extension_decides_the_format(adata, name):
    CALLS[name](adata, save="_x.png", show=False)  # file_format_figs is "pdf"
    assert (sc.settings.figdir / f"{name}_x.png").read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in sc.settings.figdir.iterdir()] == [f"{name}_x.png"]


@pytest.mark.parametrize("name", CALLS)
def test_show_returns_none_and_shows(adata, name, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(True))
    assert CALLS[name](adata, show=True) is None
    sc.settings.autoshow = True
    assert CALLS[name](adata) is None  # show=None follows sc.settings.autoshow
    assert shown == [True, True]
    assert plt.get_fignums() == []  # shown figures are released
    sc.settings.autoshow = False
    assert CALLS[name](adata) is not None
    assert shown == [True, True]
    assert not sc.settings.figdir.exists()  # save=None follows autosave (False)


def test_savefig_or_show_without_extension_and_bad_save(tmp_path):
    fig = plt.figure()
    assert _savefig_or_show("fig", show=False, save="_raw", fig=fig) is False
    assert (sc.settings.figdir / "fig_raw.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(TypeError, match="`save` must be True, False, None or a file name"):
        _savefig_or_show("fig", show=False, save=1, fig=plt.figure())
