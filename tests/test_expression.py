"""Normalised expression, differential expression and gene programs read off fitted decoders."""

import anndata as ad
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from _synthetic import log_adata, two_batch_counts

import scvae_tools as sv
from scvae_tools.models._expression import default_pseudocount, fdr_de_prediction

matplotlib.use("Agg")

QUIET = {"progress": False, "return_model": True}
UP, DOWN = [f"g{j}" for j in range(10)], [f"g{j}" for j in range(10, 20)]


def planted_de(n_cells: int = 600, n_genes: int = 100, seed: int = 0) -> ad.AnnData:
    """Counts of two groups, A and B: B has 10 genes 4x up (g0-g9) and 10 4x down (g10-g19).

    The up genes have baseline 1 and the down genes 4, so B gains as many counts as it loses
    and the other genes' proportions do not move. ``obs["half"]`` splits cells at random.
    """
    rng = np.random.default_rng(seed)
    groups = np.repeat(["A", "B"], n_cells // 2)
    base = rng.gamma(2.0, 1.0, n_genes) + 0.2
    base[:10], base[10:20] = 1.0, 4.0
    fold = np.ones((2, n_genes))
    fold[1, :10], fold[1, 10:20] = 4.0, 0.25
    library = rng.lognormal(0.0, 0.3, n_cells)
    counts = rng.poisson(base * fold[(groups == "B").astype(int)] * library[:, None])
    return ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(
            {
                "group": pd.Categorical(groups),
                "half": pd.Categorical(rng.integers(0, 2, n_cells).astype(str)),
            },
            index=[f"c{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )


def planted_programs(n_cells: int = 600, n_genes: int = 90, seed: int = 0) -> ad.AnnData:
    """Counts driven by 3 sparse programs: program k raises genes 10k..10k+9 where active.

    Each program is active in a cell with probability 0.35, with a gamma strength (mean 2 on
    the log scale). ``obs["prog"]``: the strongest program of each cell.
    """
    rng = np.random.default_rng(seed)
    strength = (rng.random((n_cells, 3)) < 0.35) * rng.gamma(4.0, 0.5, (n_cells, 3))
    loadings = np.zeros((3, n_genes))
    for k in range(3):
        loadings[k, 10 * k : 10 * k + 10] = 1.0
    log_base = np.log(rng.gamma(2.0, 1.0, n_genes) + 0.5)
    counts = rng.poisson(np.exp(log_base + strength @ loadings))
    return ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(
            {"prog": pd.Categorical(np.argmax(strength, 1).astype(str))},
            index=[f"c{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )


@pytest.fixture(scope="module")
def batched():
    adata = two_batch_counts()
    model = sv.tl.vae(adata, likelihood="nb", batch_key="batch", epochs=10, batch_size=64, **QUIET)
    return adata, model


@pytest.fixture(scope="module")
def planted():
    adata = planted_de()
    # The MLP decoder: its loadings are the Jacobian (a test below), not exact weights.
    model = sv.tl.vae(
        adata,
        likelihood="nb",
        decoder="mlp",
        beta=1.0,
        n_latent=4,
        epochs=40,
        batch_size=64,
        **QUIET,
    )
    return adata, model


def _snapshot(adata):
    return {
        "X": adata.X.copy(),
        "obs": adata.obs.copy(),
        "obsm": set(adata.obsm),
        "uns": set(adata.uns),
        "layers": set(adata.layers),
        "varm": set(adata.varm),
    }


def _assert_unchanged(adata, snap):
    assert (adata.X != snap["X"]).nnz == 0
    assert adata.obs.equals(snap["obs"])
    assert set(adata.obsm) == snap["obsm"] and set(adata.uns) == snap["uns"]
    assert set(adata.layers) == snap["layers"] and set(adata.varm) == snap["varm"]


@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_count_rows_sum_to_library_size(likelihood):
    adata = two_batch_counts(n_cells=120, n_genes=40)
    model = sv.tl.ae(adata, likelihood=likelihood, epochs=2, batch_size=64, **QUIET)
    prop = model.normalized_expression(adata)
    assert prop.shape == adata.shape and prop.dtype == np.float32
    assert (prop > 0).all()
    np.testing.assert_allclose(prop.sum(1), 1.0, rtol=1e-5)
    per_10k = model.normalized_expression(adata, library_size=1e4)
    np.testing.assert_allclose(per_10k.sum(1), 1e4, rtol=1e-5)
    some = model.normalized_expression(adata, library_size=1e4, genes=["gene3", "gene0"])
    np.testing.assert_allclose(some, per_10k[:, [3, 0]], rtol=1e-6)


def test_gaussian_is_the_reconstruction_on_the_input_scale():
    adata = log_adata(n_cells=120, n_genes=40)
    model = sv.tl.ae(adata, epochs=2, batch_size=64, **QUIET)
    out = model.normalized_expression(adata)
    with torch.no_grad():
        expected = model.module.reconstruct(torch.from_numpy(model.encode(adata))).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out.sum(1), 1.0)  # log scale, not proportions
    with pytest.raises(ValueError, match="count likelihoods only"):
        model.normalized_expression(adata, library_size=1e4)
    # DE goes back from log1p: scaled input (negative values) is refused, not misread.
    adata.obs["group"] = pd.Categorical(np.arange(adata.n_obs) % 2 == 0).rename_categories(
        ["a", "b"]
    )
    assert model.differential_expression(adata, "group", "a", n_samples=5).shape[0] == 40
    scaled = adata.copy()
    sc.pp.scale(scaled)
    before = scaled.X.copy()
    with pytest.raises(ValueError, match="negative values"):
        model.differential_expression(scaled, "group", "a", n_samples=5)
    np.testing.assert_array_equal(scaled.X, before)


def test_transform_batch_changes_the_output_only_through_the_batch(batched):
    adata, model = batched
    own = model.normalized_expression(adata)
    as_b0 = model.normalized_expression(adata, transform_batch="b0")
    as_b1 = model.normalized_expression(adata, transform_batch="b1")
    assert np.abs(as_b0 - as_b1).max() > 1e-3
    # The codes are the same (the encoder does not see the batch): decoding them with batch
    # b0's one-hot by hand gives transform_batch="b0".
    codes = torch.from_numpy(model.encode(adata))
    onehot = torch.zeros(adata.n_obs, 2)
    onehot[:, 0] = 1.0
    with torch.no_grad():
        by_hand = torch.softmax(model.module.decoder_logits(codes, onehot), -1).numpy()
    np.testing.assert_allclose(as_b0, by_hand, rtol=1e-5, atol=1e-8)
    in_b0 = (adata.obs["batch"] == "b0").to_numpy()
    np.testing.assert_allclose(as_b0[in_b0], own[in_b0], rtol=1e-6)
    assert np.abs(as_b0[~in_b0] - own[~in_b0]).max() > 1e-3
    both = model.normalized_expression(adata, transform_batch=["b0", "b1"])
    np.testing.assert_allclose(both, (as_b0 + as_b1) / 2, rtol=1e-5, atol=1e-8)
    # With transform_batch, and an encoder blind to the batch, no batch column is needed.
    bare = adata.copy()
    del bare.obs["batch"]
    np.testing.assert_allclose(
        model.normalized_expression(bare, transform_batch="b1"), as_b1, rtol=1e-6
    )


def test_chunked_equals_unchunked(batched, tmp_path):
    adata, model = batched
    whole = model.normalized_expression(adata, batch_size=100_000)
    chunked = model.normalized_expression(adata, batch_size=7)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-8)
    dense = adata.copy()
    dense.X = dense.X.toarray()
    np.testing.assert_allclose(model.normalized_expression(dense), whole, rtol=1e-5, atol=1e-8)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    np.testing.assert_allclose(
        model.normalized_expression(backed, batch_size=50), whole, rtol=1e-5, atol=1e-8
    )


def test_random_halves_of_one_population_call_almost_nothing(planted):
    adata, vae = planted
    ae = sv.tl.ae(adata, likelihood="nb", n_latent=4, epochs=20, batch_size=64, **QUIET)
    one_population = adata[adata.obs["group"] == "A"].copy()
    for model in (vae, ae):  # posterior samples and bootstrap (VAE), bootstrap only (AE)
        table = model.differential_expression(one_population, "half", "0", "1")
        assert table["is_de"].sum() <= 0.01 * adata.n_vars
        assert table["lfc_mean"].abs().max() < 0.5


def test_planted_fold_change_is_found_with_the_right_sign(planted):
    adata, model = planted
    table = model.differential_expression(adata, "group", "B", "A")
    assert list(table.index) == list(adata.var_names)
    assert table.loc[UP + DOWN, "is_de"].all()
    assert (table.loc[UP, "lfc_mean"] > 1.0).all() and (table.loc[DOWN, "lfc_mean"] < -1.0).all()
    assert table.loc[UP + DOWN, "lfc_mean"].abs().between(1.0, 3.0).all()  # log2(4) = 2
    others = table.drop(index=UP + DOWN)
    assert others["is_de"].sum() <= 5
    assert table["prob_de"].between(0, 1).all() and (table["lfc_std"] >= 0).all()
    ratio = np.log2((table["norm_mean1"] + 0.1) / (table["norm_mean2"] + 0.1))
    assert (np.sign(ratio[UP + DOWN]) == np.sign(table.loc[UP + DOWN, "lfc_mean"])).all()
    X = adata.X.toarray()
    in_b = (adata.obs["group"] == "B").to_numpy()
    np.testing.assert_allclose(table["frac_expressing1"], (X[in_b] > 0).mean(0))
    np.testing.assert_allclose(table["frac_expressing2"], (X[~in_b] > 0).mean(0))
    # group2=None is the rest, here group A; the same seed gives the same table.
    rest = model.differential_expression(adata, "group", "B")
    pd.testing.assert_frame_equal(rest, table)


def test_default_pseudocount_is_one_count_of_the_median_cell(planted):
    adata, model = planted
    one_count = 1e4 / np.median(np.asarray(adata.X.sum(1)).ravel())
    assert default_pseudocount(model, adata.X) == pytest.approx(one_count)
    default = model.differential_expression(adata, "group", "B", "A")
    pd.testing.assert_frame_equal(
        default, model.differential_expression(adata, "group", "B", "A", pseudocount=one_count)
    )
    # A pseudocount far below one count lets every fold change grow (the same samples).
    tiny = model.differential_expression(adata, "group", "B", "A", pseudocount=1e-3)
    planted_genes = UP + DOWN
    assert (
        default.loc[planted_genes, "lfc_mean"].abs() < tiny.loc[planted_genes, "lfc_mean"].abs()
    ).all()
    assert default["lfc_mean"].abs().mean() < tiny["lfc_mean"].abs().mean()
    # rank_genes_groups records the value it used (all cells': each group against the rest).
    ranked = adata.copy()
    sv.tl.rank_genes_groups(ranked, model, "group", n_samples=10)
    assert ranked.uns["rank_genes_groups"]["params"]["pseudocount"] == pytest.approx(one_count)


def test_fdr_control_takes_the_largest_set_within_the_target():
    prob = np.array([0.5, 0.99, 0.96, 0.9, 1.0])
    is_de, fdr = fdr_de_prediction(prob, 0.05)
    # Sorted: 1.0, 0.99, 0.96, 0.9, 0.5 -> running mean of 1 - p: 0, .005, .0167, .0375, .13
    np.testing.assert_allclose(fdr, [0.13, 0.005, 1 / 60, 0.0375, 0.0])
    assert is_de.tolist() == [False, True, True, True, True]
    assert not fdr_de_prediction(np.full(5, 0.5), 0.05)[0].any()


def test_rank_genes_groups_is_read_and_drawn_by_scanpy(planted, tmp_path):
    adata, model = planted
    adata = adata.copy()
    sv.tl.rank_genes_groups(adata, model, "group", n_samples=50)
    record = adata.uns["rank_genes_groups"]
    assert record["params"]["groupby"] == "group" and record["params"]["reference"] == "rest"
    assert record["names"].dtype.names == ("A", "B")
    table = sc.get.rank_genes_groups_df(adata, "B")
    assert set(table["names"][:10]) == set(UP)  # up in B first
    assert set(table["names"][-10:]) == set(DOWN)  # down last
    assert {"pct_nz_group", "pct_nz_reference"} <= set(table.columns)
    direct = model.differential_expression(adata, "group", "B", n_samples=50, random_state=1)
    by_gene = table.set_index("names")
    np.testing.assert_allclose(by_gene.loc[UP, "pvals"], 1 - direct.loc[UP, "prob_de"])
    np.testing.assert_allclose(by_gene.loc[UP, "logfoldchanges"], direct.loc[UP, "lfc_mean"])
    called = by_gene["pvals_adj"] <= 0.05
    assert (called == direct.loc[by_gene.index, "is_de"]).all()
    axes = sc.pl.rank_genes_groups_dotplot(adata, n_genes=3, show=False)
    assert axes is not None
    plt.close("all")
    adata.write_h5ad(tmp_path / "ranked.h5ad")
    back = ad.read_h5ad(tmp_path / "ranked.h5ad")
    pd.testing.assert_frame_equal(sc.get.rank_genes_groups_df(back, "B"), table)


def test_normalized_expression_tool_writes_a_layer_and_refuses_a_too_large_one(batched, tmp_path):
    adata, model = batched
    adata = adata.copy()
    sv.tl.normalized_expression(adata, model, library_size=1e4)
    np.testing.assert_allclose(
        adata.layers["scvae_normalized"], model.normalized_expression(adata, library_size=1e4)
    )
    assert adata.uns["scvae_normalized"]["params"]["scale"] == "proportions x library_size"
    sv.tl.normalized_expression(adata, model, layer_added="few", genes=["gene5", "gene1"])
    assert adata.uns["few"]["params"]["genes"] == ["gene5", "gene1"]
    few = adata.layers["few"]
    assert sp.issparse(few) and few.shape == adata.shape and few.nnz == 2 * adata.n_obs
    np.testing.assert_allclose(
        few[:, [5, 1]].toarray(), adata.layers["scvae_normalized"][:, [5, 1]] / 1e4, rtol=1e-5
    )
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=r"GiB.*genes="):
        sv.tl.normalized_expression(adata, model, layer_added="big", max_bytes=1000)
    _assert_unchanged(adata, snap)
    adata.write_h5ad(tmp_path / "layers.h5ad")
    back = ad.read_h5ad(tmp_path / "layers.h5ad")
    assert (back.layers["few"] != few).nnz == 0


def test_planted_programs_are_recovered_each_by_one_dimension(tmp_path):
    # A sparse code with a linear decoder; with these settings 7 of training seeds 0-8 put
    # each program's 10 genes exactly on one dimension's top 10, and 8 of 9 at least 8 of them.
    adata = planted_programs()
    model = sv.tl.vsc(
        adata,
        likelihood="nb",
        decoder="linear",
        beta=1.0,
        n_latent=3,
        hidden=(64,),
        epochs=80,
        lr=1e-2,
        batch_size=64,
        **QUIET,
    )
    sv.tl.gene_programs(adata, model, groupby="prog", n_top=10)
    record = adata.uns["vsc_programs"]
    assert record["params"]["method"] == "weights"
    loadings = adata.varm["vsc_programs"]
    assert loadings.shape == (adata.n_vars, 3)
    # Exact for the linear decoder: the output layer's weights on the code, median-centred.
    weight = model.module.output_layer.weight[:, :3].detach().numpy()
    np.testing.assert_allclose(loadings, weight - np.median(weight, 0), rtol=1e-5, atol=1e-6)
    dims = []
    for k in range(3):
        program = {f"g{j}" for j in range(10 * k, 10 * k + 10)}
        top = record["top_genes"]
        owners = [d for d in range(3) if len(set(top[str(d)]) & program) >= 8]
        assert len(owners) == 1, f"program {k}: top genes of the dimensions {top}"
        dims.append(owners[0])
    assert sorted(dims) == [0, 1, 2]
    assert record["active_share"].shape == (3,)
    assert ((record["active_share"] > 0) & (record["active_share"] < 1)).all()
    spike = record["spike_by_group"]
    assert list(spike.index) == ["0", "1", "2"] and list(spike.columns) == ["0", "1", "2"]
    assert ((spike >= 0) & (spike <= 1)).all().all()
    ax = sv.pl.gene_programs(adata, "vsc_programs", n_top=3, show=False)
    assert len(ax.get_yticklabels()) == 9 and "active" in ax.get_xticklabels()[0].get_text()
    figdir = sc.settings.figdir
    sc.settings.figdir = tmp_path
    try:
        assert sv.pl.gene_programs(adata, "vsc_programs", show=False, save="_x.png") is not None
    finally:
        sc.settings.figdir = figdir
    assert (tmp_path / "gene_programs_x.png").exists()
    with pytest.raises(ValueError, match="dims"):
        sv.pl.gene_programs(adata, "vsc_programs", dims=[3], show=False)
    plt.close("all")
    adata.write_h5ad(tmp_path / "programs.h5ad")
    back = ad.read_h5ad(tmp_path / "programs.h5ad")
    np.testing.assert_array_equal(back.varm["vsc_programs"], loadings)
    assert back.uns["vsc_programs"]["top_genes"].equals(record["top_genes"])


def test_mlp_decoder_loadings_are_the_jacobian_averaged_over_the_cells(planted):
    adata, model = planted
    adata = adata.copy()
    sv.tl.gene_programs(adata, model, key_added="prog")
    assert adata.uns["prog"]["params"]["method"] == "jacobian"
    loadings = adata.varm["prog"]
    codes = torch.from_numpy(model.encode(adata))
    step = 1e-3
    with torch.no_grad():
        for k in range(model.n_latent):
            shift = torch.zeros_like(codes)
            shift[:, k] = step
            diff = model.module.decoder_logits(codes + shift) - model.module.decoder_logits(
                codes - shift
            )
            column = (diff / (2 * step)).mean(0).numpy()
            column -= np.median(column)
            np.testing.assert_allclose(loadings[:, k], column, atol=2e-3)


def test_bad_input_raises_and_changes_nothing(batched, planted):
    adata, model = batched
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=r"not trained on.*'b9'"):
        model.normalized_expression(adata, transform_batch="b9")
    with pytest.raises(ValueError, match="not trained on"):
        sv.tl.normalized_expression(adata, model, transform_batch=["b0", "b9"])
    with pytest.raises(ValueError, match="not among the model's"):
        sv.tl.normalized_expression(adata, model, genes=["gene1", "nope"])
    bare = adata.copy()
    del bare.obs["batch"]
    with pytest.raises(KeyError, match="batch_key="):
        model.normalized_expression(bare)
    with pytest.raises(ValueError, match="not found in the column"):
        model.differential_expression(adata, "group", "nope")
    with pytest.raises(ValueError, match="unknown group"):
        sv.tl.rank_genes_groups(adata, model, "group", groups=["0", "nope"])
    with pytest.raises(KeyError, match="groupby="):
        sv.tl.rank_genes_groups(adata, model, "cell_type")
    _assert_unchanged(adata, snap)
    sees_batch = sv.tl.ae(
        adata.copy(), likelihood="nb", batch_key="batch", encode_covariates=True, epochs=1, **QUIET
    )
    with pytest.raises(KeyError, match="encoder sees the batch"):
        sees_batch.normalized_expression(bare, transform_batch="b0")
    no_batches, plain = planted
    with pytest.raises(ValueError, match="without a batch_key"):
        plain.normalized_expression(no_batches, transform_batch="A")
    with pytest.raises(TypeError, match="LatentModel"):
        sv.tl.gene_programs(no_batches, "model")


def test_posterior_draws_follow_each_latent_layer():
    from scvae_tools.models import LatentOutput
    from scvae_tools.models._latent import DeterministicLatent, GaussianLatent, SpikeSlabLatent

    n, k = 20_000, 2
    mu = torch.tensor([[1.0, -2.0]]).expand(n, k)
    log_sigma = torch.log(torch.tensor([[0.5, 2.0]])).expand(n, k)
    generator = torch.Generator().manual_seed(0)
    code = DeterministicLatent(4, (), k).draw(LatentOutput(z=mu, mean=mu), generator)
    assert torch.equal(code, mu)
    gaussian = GaussianLatent(4, (), k).draw(
        LatentOutput(z=mu, mean=mu, extras={"log_sigma": log_sigma}), generator
    )
    np.testing.assert_allclose(gaussian.mean(0), [1.0, -2.0], atol=0.05)
    np.testing.assert_allclose(gaussian.std(0), [0.5, 2.0], rtol=0.03)
    spike = torch.tensor([[0.0, 0.3]]).expand(n, k)
    extras = {"spike": spike, "mu": mu, "log_sigma": log_sigma}
    sparse = SpikeSlabLatent(4, (), k).draw(
        LatentOutput(z=spike * mu, mean=spike * mu, extras=extras), generator
    )
    assert (sparse[:, 0] == 0).all()  # a dimension that is never active is exactly zero
    active = sparse[:, 1] != 0
    assert abs(active.float().mean().item() - 0.3) < 0.02  # a hard draw, not a relaxed one
    np.testing.assert_allclose(sparse[active, 1].mean(), -2.0, atol=0.1)
