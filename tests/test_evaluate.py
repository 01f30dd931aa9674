"""sv.tl.evaluate, sv.tl.tsne3d and the reproduce command."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from _synthetic import SHARED_PBMC3K, log_adata

import scvae_tools as sv
from scvae_tools._reproduce import load_data
from scvae_tools.cli import main

FAST = {"n_seeds": 2, "n_init": 3, "perplexity": 10, "progress": False}


def _with_reps(n_cells: int = 150):
    adata = log_adata(n_cells=n_cells, n_genes=30)
    groups = adata.obs["group"].cat.codes.to_numpy()
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 20, size=(3, 4))
    adata.obsm["X_good"] = (centres[groups] + rng.normal(0, 1, (n_cells, 4))).astype(np.float32)
    adata.obsm["X_noise"] = rng.normal(0, 1, (n_cells, 4)).astype(np.float32)
    return adata


def test_evaluate_scores_separate_informative_from_random_latents():
    adata = _with_reps()
    summary = sv.tl.evaluate(adata, "group", reps=("X_good", "X_noise"), **FAST)
    mean = summary.set_index(["rep", "metric"])["mean"]
    for metric in ("nmi", "ari", "homogeneity", "completeness", "latent_nmi", "latent_ari"):
        assert mean["X_good", metric] > 0.95, metric
        assert mean["X_noise", metric] < 0.2, metric
    assert mean["X_good", "knn_purity"] > 0.95 > 0.6 > mean["X_noise", "knn_purity"]
    assert mean["X_good", "silhouette"] > 0.5 > mean["X_noise", "silhouette"]


def test_evaluate_output_layout():
    adata = _with_reps()
    before = adata.copy()
    summary = sv.tl.evaluate(adata, "group", reps=("X_good", "X_noise"), **FAST)
    assert list(summary.columns) == ["rep", "metric", "mean", "std", "n_seeds"]
    assert len(summary) == 2 * 8
    assert list(summary["rep"].unique()) == ["X_good", "X_noise"]
    assert list(summary["metric"][:4]) == ["nmi", "ari", "homogeneity", "completeness"]
    assert (summary["n_seeds"] == 2).all() and (summary["std"] >= 0).all()
    record = adata.uns["evaluate"]
    assert record["summary"].equals(summary)
    runs = record["runs"]
    assert len(runs) == 2 * 2 * 8 and set(runs["seed"]) == {0, 1}
    # The summary is the mean of the runs.
    nmi = runs.query("rep == 'X_noise' and metric == 'nmi'")["value"]
    stored = summary.set_index(["rep", "metric"]).loc[("X_noise", "nmi"), "mean"]
    assert np.isclose(stored, nmi.mean())
    assert record["params"]["label_key"] == "group" and record["params"]["n_clusters"] == 3
    assert adata.obsm["X_tsne_good"].shape == (adata.n_obs, 2)
    assert adata.obsm["X_tsne_good"].dtype == np.float32
    km = adata.obs["kmeans_good"]
    assert isinstance(km.dtype, pd.CategoricalDtype) and len(km.cat.categories) == 3
    # Nothing but its own keys.
    assert set(adata.obsm) - set(before.obsm) == {"X_tsne_good", "X_tsne_noise"}
    assert set(adata.obs.columns) - set(before.obs.columns) == {"kmeans_good", "kmeans_noise"}
    assert set(adata.uns) - set(before.uns) == {"evaluate"}
    assert (adata.X != before.X).nnz == 0
    for key in before.obsm:
        np.testing.assert_array_equal(adata.obsm[key], before.obsm[key])
    # The stored results survive an h5ad round trip.
    assert isinstance(record["summary"], pd.DataFrame)


def test_evaluate_same_seed_same_scores():
    a, b = _with_reps(), _with_reps()
    s1 = sv.tl.evaluate(a, "group", reps=("X_noise",), **FAST)
    s2 = sv.tl.evaluate(b, "group", reps=("X_noise",), **FAST)
    pd.testing.assert_frame_equal(s1, s2)
    s3 = sv.tl.evaluate(b, "group", reps=("X_noise",), random_state=5, **FAST)
    assert not np.allclose(s1["mean"], s3["mean"])


def test_evaluate_results_written_to_h5ad(tmp_path):
    adata = _with_reps()
    sv.tl.evaluate(adata, "group", reps=("X_good",), **FAST)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = sc.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(
        back.uns["evaluate"]["summary"].reset_index(drop=True),
        adata.uns["evaluate"]["summary"],
        check_dtype=False,
    )


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "match"),
    [
        (None, {"label_key": "nope"}, KeyError, "no column 'nope'.*group"),
        (None, {"reps": ("X_missing",)}, KeyError, "no 'X_missing'.*X_good"),
        ("nan_label", {}, ValueError, "no 'group' label"),
        ("one_class", {}, ValueError, "single class"),
        ("nan_rep", {}, ValueError, "NaN or infinite"),
        (None, {"perplexity": 1000}, ValueError, "perplexity"),
        (None, {"n_seeds": 0}, ValueError, "n_seeds"),
    ],
)
def test_evaluate_bad_input_is_a_clear_error_and_changes_nothing(change, kwargs, error, match):
    adata = _with_reps()
    if change == "nan_label":
        adata.obs["group"] = adata.obs["group"].astype(object)
        adata.obs.iloc[3, adata.obs.columns.get_loc("group")] = np.nan
    elif change == "one_class":
        adata.obs["group"] = "a"
    elif change == "nan_rep":
        adata.obsm["X_good"][0, 0] = np.nan
    before = adata.copy()
    args = {"label_key": "group", "reps": ("X_good",), **FAST, **kwargs}
    with pytest.raises(error, match=match):
        sv.tl.evaluate(adata, **args)
    assert set(adata.obsm) == set(before.obsm)
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert set(adata.uns) == set(before.uns)


def test_tsne3d_writes_a_3d_embedding_scanpy_can_plot():
    adata = _with_reps()
    sv.tl.tsne3d(adata, "X_good", perplexity=10)
    emb = adata.obsm["X_tsne3d"]
    assert emb.shape == (adata.n_obs, 3) and emb.dtype == np.float32
    assert adata.uns["tsne3d"]["params"]["use_rep"] == "X_good"
    # The clusters of X_good stay apart in 3-D: nearest neighbours mostly share the group,
    # unlike those of the noise representation.
    codes = adata.obs["group"].cat.codes.to_numpy()

    def nn_agreement(e):
        dist = np.linalg.norm(e[:, None] - e[None], axis=2)
        np.fill_diagonal(dist, np.inf)
        return (codes[dist.argmin(1)] == codes).mean()

    sv.tl.tsne3d(adata, "X_noise", perplexity=10, key_added="X_t3")
    assert adata.obsm["X_t3"].shape == (adata.n_obs, 3)
    assert nn_agreement(emb) > 0.85 > 0.55 > nn_agreement(adata.obsm["X_t3"])
    ax = sc.pl.embedding(adata, "tsne3d", projection="3d", color="group", show=False)
    assert ax.name == "3d"
    with pytest.raises(KeyError, match="X_nope"):
        sv.tl.tsne3d(adata, "X_nope")


def test_reproduce_cli_on_bundled_data_writes_report_csv_and_figures(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--out", str(out), "--epochs", "3", "--n-seeds", "1", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["rep"]) == {"X_ae", "X_vae", "X_vsc"}
    assert (metrics["n_seeds"] == 1).all()
    assert metrics["mean"].between(-1, 1).all()
    report = (out / "report.md").read_text()
    assert "bulk_labels" in report and "3 epochs" in report
    for rep in ("X_ae", "X_vae", "X_vsc"):
        nmi = metrics.query("rep == @rep and metric == 'nmi'")["mean"].iloc[0]
        assert f"| {rep} | {nmi:.3f} ±" in report
    for name in ("metrics_heatmap", "tsne_kmeans", "tsne3d", "loss_curves", "vsc_spike"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name}.png)" in report


def test_reproduce_cli_reports_a_bad_label_key(tmp_path, capsys):
    code = main(["reproduce", "--out", str(tmp_path), "--labels", "nope", "--epochs", "1"])
    assert code == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.skipif(
    not SHARED_PBMC3K.exists(),
    reason="PBMC3k test data not found at ../shared/data/pbmc3k (only on developer machines/CI)",
)
def test_reproduce_loads_raw_counts_through_the_seurat_recipe():
    adata, label_key, source = load_data(
        str(SHARED_PBMC3K / "filtered_gene_bc_matrices" / "hg19"), None
    )
    assert adata.shape == (2638, 13714)
    assert label_key == "seurat_clusters" and adata.obs[label_key].nunique() == 9
    assert "recipe_seurat" in source and "seurat_clusters" in source
    # Log-normalised: each cell's counts sum to 1e4 before log1p.
    np.testing.assert_allclose(np.expm1(adata.X[:5].toarray()).sum(1), 1e4, rtol=1e-3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_data(str(SHARED_PBMC3K / "nope.h5ad"), None)
