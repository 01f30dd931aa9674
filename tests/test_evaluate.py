"""sv.tl.evaluate, sv.tl.tsne3d and the reproduce command."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import sys

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from _synthetic import SHARED_PBMC3K, log_adata

import scvae_tools as sv
from scvae_tools._reproduce import load_data
from scvae_tools.cli import main
from scvae_tools.tl._integration import SCIB_METRICS

# pca=False: these tests are about the protocol; the PCA reference rows have their own.
FAST = {"n_seeds": 2, "n_init": 3, "perplexity": 10, "progress": False, "pca": False}


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
        (None, {"label_key": "nope"}, KeyError, "label_key='nope' is not a column.*'group'"),
        (None, {"reps": ("X_missing",)}, KeyError, "no 'X_missing'.*X_good"),
        ("nan_label", {}, ValueError, r"'group'\] has 1 missing value.*needs a label"),
        ("one_class", {}, ValueError, "single class"),
        ("nan_rep", {}, ValueError, "NaN or infinite"),
        (None, {"perplexity": 1000}, ValueError, "perplexity"),
        (None, {"n_seeds": 0}, ValueError, "n_seeds"),
        (None, {"batch_key": "nope"}, KeyError, "batch_key='nope' is not a column.*'group'"),
        ("nan_batch", {"batch_key": "batch"}, ValueError, r"1 missing value.*needs a batch"),
        ("one_batch", {"batch_key": "batch"}, ValueError, "single batch.*at least two"),
        (None, {"protocol": False}, ValueError, "protocol=False leaves nothing"),
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
    elif change == "nan_batch":
        adata.obs["batch"] = ["a", "b"] * (adata.n_obs // 2)
        adata.obs.iloc[7, adata.obs.columns.get_loc("batch")] = np.nan
    elif change == "one_batch":
        adata.obs["batch"] = "a"
    before = adata.copy()
    args = {"label_key": "group", "reps": ("X_good",), **FAST, **kwargs}
    with pytest.raises(error, match=match):
        sv.tl.evaluate(adata, **args)
    assert set(adata.obsm) == set(before.obsm)
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert set(adata.uns) == set(before.uns)


def test_evaluate_scores_the_pca_of_the_input_beside_the_latents():
    adata = _with_reps()
    args = {**FAST, "pca": True, "n_seeds": 1}
    summary = sv.tl.evaluate(adata, "group", reps=("X_good", "X_noise"), **args)
    # The reps first, then the PCA with as many components as the latents (4) and with 10.
    assert list(dict.fromkeys(summary["rep"])) == ["X_good", "X_noise", "pca4", "pca10"]
    params = adata.uns["evaluate"]["params"]
    assert params["references"] == ["pca4", "pca10"] and params["pca_input"] == "X"
    assert adata.obsm["X_tsne_pca10"].shape == (adata.n_obs, 2)
    assert "kmeans_pca4" in adata.obs
    # The rows score the PCA of X itself: its label silhouette is that of sc.pp.pca's output.
    expected = sc.pp.pca(adata.X, n_comps=10, random_state=0)
    labels = adata.obs["group"].cat.codes.to_numpy()
    mean = summary.set_index(["rep", "metric"])["mean"]
    from sklearn.metrics import silhouette_score

    assert np.isclose(mean["pca10", "silhouette"], silhouette_score(expected, labels), atol=1e-4)
    # The groups differ in X, so PCA separates them; the noise latent does not.
    assert mean["pca10", "knn_purity"] > 0.9 > 0.6 > mean["X_noise", "knn_purity"]


def test_evaluate_pca_reference_uses_the_models_layer_log_normalised():
    adata = _with_reps()
    # A count model trained on layers["counts"] (as sv.tl.* records it).
    adata.obsm["X_vae"] = adata.obsm["X_good"][:, :3]
    adata.uns["vae"] = {"params": {"model": "vae", "layer": "counts"}}
    adata.obsm["X_pca10"] = adata.obsm["X_noise"]  # the user's own, under the reference's name
    sv.tl.evaluate(adata, "group", reps=("X_vae", "X_pca10"), **{**FAST, "pca": True, "n_seeds": 1})
    record = adata.uns["evaluate"]
    assert record["params"]["pca_input"] == "layers['counts'] (normalize_total 1e4, log1p)"
    # pca10 is already among the reps by name (the user's own), so it is not added again.
    assert record["params"]["references"] == ["pca3", "pca4"]
    counts = adata.layers["counts"].toarray()
    logged = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    expected = sc.pp.pca(logged, n_comps=3, random_state=0)
    from sklearn.metrics import silhouette_score

    labels = adata.obs["group"].cat.codes.to_numpy()
    stored = record["summary"].set_index(["rep", "metric"]).loc[("pca3", "silhouette"), "mean"]
    assert np.isclose(stored, silhouette_score(expected, labels), atol=1e-4)


def _two_batches(n_cells: int = 160, shift: float = 4.0):
    """Three labels in two batches: X carries a batch shift; two latents, batch mixed or split."""
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], [60, 60, 40])[:n_cells]
    batch = np.tile([0, 1], n_cells // 2)
    centres = rng.normal(0, 8, size=(3, 20))
    x = centres[labels] + rng.normal(0, 1, (n_cells, 20)) + shift * batch[:, None]
    adata = ad.AnnData(x.astype(np.float32))
    adata.obs["cell_type"] = pd.Categorical(np.array(["B", "NK", "T"])[labels])
    adata.obs["sample"] = pd.Categorical(np.array(["s1", "s2"])[batch])
    z_centres = rng.normal(0, 6, size=(3, 5))
    z = z_centres[labels] + rng.normal(0, 1, (n_cells, 5))
    adata.obsm["X_mixed"] = z.astype(np.float32)
    adata.obsm["X_split"] = (z + 3.0 * batch[:, None]).astype(np.float32)
    return adata


def test_evaluate_without_scib_metrics_names_the_extra(monkeypatch):
    adata = _two_batches()
    before = adata.copy()
    monkeypatch.setitem(sys.modules, "scib_metrics", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "scvae-tools\[metrics\]"'):
        sv.tl.evaluate(adata, "cell_type", reps=("X_mixed",), batch_key="sample", **FAST)
    assert set(adata.uns) == set(before.uns) and set(adata.obsm) == set(before.obsm)
    assert list(adata.obs.columns) == list(before.obs.columns)
    # The protocol alone needs no extra.
    sv.tl.evaluate(adata, "cell_type", reps=("X_mixed",), **{**FAST, "n_seeds": 1})
    assert "scib" not in adata.uns["evaluate"]


def test_evaluate_batch_key_adds_the_scib_metrics_mixed_beats_split():
    adata = _two_batches()
    # One seed of the protocol beside the scIB metrics.
    summary = sv.tl.evaluate(
        adata,
        "cell_type",
        reps=("X_mixed", "X_split"),
        batch_key="sample",
        **{**FAST, "n_seeds": 1},
    )
    scib = adata.uns["evaluate"]["scib"]
    assert list(scib.index) == ["X_mixed", "X_split"]
    assert list(scib.columns) == list(SCIB_METRICS)
    assert ((scib >= 0) & (scib <= 1)).all().all()
    # Both keep the labels apart; only X_mixed mixes the batches within each label.
    for metric in ("kmeans_nmi", "kmeans_ari", "clisi"):
        assert scib.loc["X_mixed", metric] > 0.95 and scib.loc["X_split", metric] > 0.95
    for metric in ("isolated_labels", "silhouette_label"):
        assert scib.loc["X_mixed", metric] > 0.7 and scib.loc["X_split", metric] > 0.7
    for metric in ("ilisi", "kbet", "silhouette_batch", "batch_correction", "total"):
        assert scib.loc["X_mixed", metric] > scib.loc["X_split", metric] + 0.05, metric
    assert scib.loc["X_mixed", "ilisi"] > 0.8 > 0.3 > scib.loc["X_split", "ilisi"]
    bio = ["isolated_labels", "kmeans_nmi", "kmeans_ari", "silhouette_label", "clisi"]
    batch = ["silhouette_batch", "ilisi", "kbet", "graph_connectivity", "pcr_comparison"]
    np.testing.assert_allclose(scib["bio_conservation"], scib[bio].mean(1))
    np.testing.assert_allclose(scib["batch_correction"], scib[batch].mean(1))
    np.testing.assert_allclose(
        scib["total"], 0.6 * scib["bio_conservation"] + 0.4 * scib["batch_correction"]
    )
    # The same values in the tidy summary, once each (no seeds), beside the protocol's.
    rows = summary.set_index(["rep", "metric"])
    assert rows.loc[("X_split", "total"), "mean"] == scib.loc["X_split", "total"]
    assert rows.loc[("X_split", "total"), "n_seeds"] == 1
    assert np.isnan(rows.loc[("X_split", "total"), "std"])
    assert rows.loc[("X_split", "nmi"), "n_seeds"] == 1 and rows.loc[("X_split", "nmi"), "std"] == 0
    assert adata.uns["evaluate"]["params"]["batch_key"] == "sample"


def test_evaluate_scib_metrics_match_scib_metrics_benchmarker():
    """Our glue gives what scib-metrics' own pipeline gives on the same neighbours."""
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
    from scib_metrics.metrics import silhouette_batch
    from sklearn.neighbors import NearestNeighbors

    from scvae_tools.tl._integration import METRIC_NAMES

    adata = _two_batches()
    sv.tl.evaluate(
        adata,
        "cell_type",
        reps=("X_mixed", "X_split"),
        batch_key="sample",
        protocol=False,
        progress=False,
        pca=False,
    )
    ours = adata.uns["evaluate"]["scib"]
    adata.obsm["X_pre"] = sc.pp.pca(adata.X, n_comps=19, random_state=0)

    def exact(x, k):
        from scib_metrics.nearest_neighbors import NeighborsResults

        dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
        return NeighborsResults(indices=idx, distances=dist)

    bench = Benchmarker(
        adata,
        "sample",
        "cell_type",
        ["X_mixed", "X_split"],
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=BatchCorrection(bras=False),
        pre_integrated_embedding_obsm_key="X_pre",
        progress_bar=False,
    )
    bench.prepare(neighbor_computer=exact)
    bench.benchmark()
    theirs = bench.get_results(min_max_scale=False).drop("Metric Type")
    # Every single metric, and the bio total (the same five metrics). The batch total differs
    # by design: this scib-metrics' Benchmarker has BRAS in place of scIB's batch silhouette.
    for name, column in METRIC_NAMES.items():
        if column in theirs.columns and name not in ("batch_correction", "total"):
            np.testing.assert_allclose(
                ours[name].to_numpy(),
                theirs[column].astype(float).to_numpy(),
                rtol=1e-5,
                err_msg=name,
            )
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    batches = adata.obs["sample"].cat.codes.to_numpy()
    for rep in ("X_mixed", "X_split"):
        expected = silhouette_batch(adata.obsm[rep], codes, batches)
        assert np.isclose(ours.loc[rep, "silhouette_batch"], expected, rtol=1e-5)


def test_evaluate_scib_only_writes_no_tsne_and_survives_h5ad(tmp_path):
    adata = _two_batches()
    before = adata.copy()
    summary = sv.tl.evaluate(
        adata, "cell_type", reps=("X_mixed",), batch_key="sample", protocol=False, progress=False
    )
    assert set(summary["metric"]) == set(SCIB_METRICS)
    assert list(dict.fromkeys(summary["rep"])) == ["X_mixed", "pca5", "pca10"]
    record = adata.uns["evaluate"]
    assert record["runs"].empty
    # The uncorrected PCA of X keeps the batch shift: the latent mixes better.
    scib = record["scib"]
    assert scib.loc["X_mixed", "ilisi"] > scib.loc["pca10", "ilisi"] + 0.3
    assert set(adata.obsm) == set(before.obsm)
    assert list(adata.obs.columns) == list(before.obs.columns)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = sc.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(back.uns["evaluate"]["scib"], scib, check_dtype=False)


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
    plt.close(ax.figure)  # tests of sv.pl check that no figure is left open
    with pytest.raises(KeyError, match="X_nope"):
        sv.tl.tsne3d(adata, "X_nope")


def test_reproduce_cli_on_bundled_data_writes_report_csv_and_figures(tmp_path, capsys, monkeypatch):
    from scvae_tools._reproduce import WRITEUP_CONFIG

    params = {}
    for name in ("ae", "vae", "vsc"):
        tool = getattr(sv.tl, name)

        def recording(adata, _tool=tool, _name=name, **kwargs):
            _tool(adata, **kwargs)
            params[_name] = dict(adata.uns[_name]["params"])

        monkeypatch.setattr(sv.tl, name, recording)
    out = tmp_path / "rep"
    assert main(["reproduce", "--out", str(out), "--epochs", "3", "--n-seeds", "1", "--quiet"]) == 0
    # The write-up's configuration runs whatever the tools' defaults are, and is recorded.
    for name, config in WRITEUP_CONFIG.items():
        assert params[name]["decoder"] == "mlp"
        for key, value in config.items():
            recorded = params[name][key]
            assert (list(recorded) if key == "hidden" else recorded) == (
                list(value) if key == "hidden" else value
            ), (name, key)
    assert capsys.readouterr().out == ""
    metrics = pd.read_csv(out / "metrics.csv")
    # The models and, beside them, the PCA of the same input (6 components as the latents, 10).
    assert list(dict.fromkeys(metrics["rep"])) == ["X_ae", "X_vae", "X_vsc", "pca6", "pca10"]
    assert (metrics["n_seeds"] == 1).all()
    assert metrics["mean"].between(-1, 1).all()
    report = (out / "report.md").read_text()
    assert "bulk_labels" in report and "3 epochs" in report
    assert "The write-up's configuration (6 latent dimensions" in report
    assert "PCA of the same input" in report
    for rep in ("X_ae", "X_vae", "X_vsc", "pca6", "pca10"):
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
