"""sv.tl.map_query (scArches' surgery) and sv.tl.transfer_labels."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scvae_tools as sv

FAST = {"epochs": 3, "batch_size": 64, "progress": False}


def reference_and_query(seed=0, n_ref=300, n_query=150, n_genes=40, n_groups=3, swap=8.0):
    """Counts of ``n_groups`` types: a reference in batches b0, b1, a query in batch "q".

    Each type has 8 marker genes of its own. The query has a new batch effect that damps type
    0's markers and boosts type 1's by ``swap`` (and a mild gene-wise factor), so that its
    cells look like another type to an encoder told they come from a known batch.
    """
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.0, 1.0, size=(n_groups, n_genes))
    markers = rng.choice(n_genes, (n_groups, 8), replace=False)
    base[np.arange(n_groups)[:, None], markers] += 6.0
    effects = np.exp(rng.normal(0.0, 1.0, size=(2, n_genes)))
    shift = np.exp(rng.normal(0.0, 0.3, size=n_genes))
    shift[markers[0]] /= swap
    shift[markers[1]] *= swap

    def cells(n, effect, batch):
        groups = rng.integers(0, n_groups, n)
        counts = rng.poisson(base[groups] * effect).astype(np.float32)
        obs = pd.DataFrame(
            {"group": pd.Categorical(groups.astype(str)), "batch": batch},
            index=[f"{batch}_{i}" for i in range(n)],
        )
        genes = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
        return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=genes)

    half = n_ref // 2
    reference = ad.concat([cells(half, effects[0], "b0"), cells(n_ref - half, effects[1], "b1")])
    reference.obs["batch"] = reference.obs["batch"].astype("category")
    return reference, cells(n_query, shift, "q")


def _reference_model(reference, kind="vae", likelihood="nb", **kw):
    X = reference.X
    if likelihood == "gaussian":  # log-normalised copy for the squared error
        reference = reference.copy()
        reference.X = sp.csr_matrix(np.log1p(X.toarray()).astype(np.float32))
    options = {"batch_key": "batch", "encode_covariates": True, **FAST, **kw}
    model = getattr(sv.tl, kind)(reference, likelihood=likelihood, return_model=True, **options)
    return reference, model


def _snapshot(adata):
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return X, adata.obs.copy(), adata.var.copy(), set(adata.obsm), set(adata.uns)


def _assert_unchanged(adata, snapshot):
    X, obs, var, obsm, uns = snapshot
    now = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(now, X)
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert set(adata.obsm) == obsm and set(adata.uns) == uns


@pytest.mark.parametrize(
    ("kind", "likelihood"), [("ae", "gaussian"), ("vae", "nb"), ("vsc", "zinb")]
)
def test_surgery_trains_only_the_new_columns_and_freezes_the_reference(kind, likelihood):
    reference, query = reference_and_query(n_ref=160, n_query=80)
    query.obs["batch"] = np.where(np.arange(query.n_obs) % 2, "q1", "q2")
    if likelihood == "gaussian":
        query.X = sp.csr_matrix(np.log1p(query.X.toarray()).astype(np.float32))
    reference, model = _reference_model(reference, kind, likelihood)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    columns = model.module.batch_columns()
    initial = model.with_batches(["q1", "q2"]).module.state_dict()
    seed_state = torch.random.get_rng_state()

    extended = sv.tl.map_query(query, model, return_model=True, **FAST)

    # The model passed in is untouched, and so is torch's global random state.
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.random.get_rng_state(), seed_state)
    # Every reference weight of the extended model is the reference's, bit for bit; only the
    # two new batch columns of each batch-reading weight moved.
    state = extended.module.state_dict()
    assert extended.batch_categories == ["b0", "b1", "q1", "q2"]
    assert set(extended.module.batch_columns()) == set(columns)
    for name, value in before.items():
        if name not in columns:
            assert torch.equal(state[name], value), name
            continue
        at = columns[name] + 2  # the reference's two batches
        assert torch.equal(state[name][:, :at], value[:, :at]), name
        rest = min(value.shape[1] - at, state[name].shape[1] - at - 2)  # bias (and padding)
        assert torch.equal(state[name][:, at + 2 : at + 2 + rest], value[:, at : at + rest]), name
        assert not torch.equal(state[name][:, at : at + 2], initial[name][:, at : at + 2]), name
    # Hence the reference's codes are exactly those of the reference model.
    key = f"X_{kind}"
    np.testing.assert_array_equal(extended.encode(reference), model.encode(reference))
    np.testing.assert_array_equal(extended.encode(reference), reference.obsm[key])
    np.testing.assert_array_equal(extended.encode(query), query.obsm[key])
    params = query.uns[kind]["params"]
    assert params["mapped"] and params["model"] == kind and params["likelihood"] == likelihood
    assert params["new_batch_categories"] == ["q1", "q2"] and params["epochs"] == 3
    assert len(query.uns[kind]["history"]["loss"]) == 3
    if kind == "vsc":
        assert query.obsm["X_vsc_spike"].shape == (query.n_obs, model.n_latent)


def test_a_shifted_new_batch_maps_closer_to_its_types_than_encoded_as_a_known_batch():
    """The query's batch effect swaps the look of two types' markers. Told it comes from b0,
    the reference encoder places many query cells among the wrong type (kNN label accuracy
    0.51 on this seed); mapped as a new batch they land on their own type (1.0). Data seeds
    0-2: 0.99-1.0 mapped against 0.39-0.67 encoded as b0."""
    reference, query = reference_and_query(seed=1)
    model = sv.tl.vae(
        reference,
        likelihood="nb",
        batch_key="batch",
        encode_covariates=True,
        epochs=60,
        batch_size=64,
        progress=False,
        return_model=True,
    )
    as_known = query.copy()
    as_known.obs["batch"] = "b0"
    sv.tl.map_query(as_known, model, progress=False)
    assert as_known.uns["vae"]["params"]["epochs"] == 0  # known batches: encoded, not trained
    np.testing.assert_array_equal(as_known.obsm["X_vae"], model.encode(as_known))
    sv.tl.map_query(query, model, epochs=80, batch_size=64, lr=1e-2, progress=False)
    accuracy = {}
    for name, adata in (("mapped", query), ("known", as_known)):
        sv.tl.transfer_labels(reference, adata, "group", use_rep="X_vae", unknown_threshold=1)
        pred, truth = adata.obs["group_pred"].astype(str), adata.obs["group"].astype(str)
        accuracy[name] = float((pred == truth).mean())
    assert accuracy["mapped"] >= 0.9, accuracy
    assert accuracy["mapped"] > accuracy["known"] + 0.2, accuracy


def test_genes_are_matched_by_name_missing_ones_zero_filled_with_a_warning():
    reference, query = reference_and_query(n_ref=120, n_query=60)
    reference, model = _reference_model(reference)
    genes = list(query.var_names)
    shuffled = query[:, genes[5:][::-1]].copy()  # 5 genes missing, the rest reversed
    shuffled = ad.concat(
        [shuffled, ad.AnnData(sp.csr_matrix((60, 3), dtype=np.float32), obs=shuffled.obs)],
        axis=1,
        merge="same",
    )
    shuffled.var_names = [*shuffled.var_names[:-3], "extra1", "extra2", "extra3"]
    filled = query.copy()
    dense = query.X.toarray()
    dense[:, :5] = 0
    filled.X = sp.csr_matrix(dense)
    with pytest.warns(UserWarning, match="5 of the model's 40 genes are missing"):
        sv.tl.map_query(shuffled, model, **FAST)
    sv.tl.map_query(filled, model, **FAST)
    np.testing.assert_array_equal(shuffled.obsm["X_vae"], filled.obsm["X_vae"])
    params = shuffled.uns["vae"]["params"]
    assert params["n_genes_missing"] == 5 and params["n_genes_dropped"] == 3


def test_a_backed_query_maps_as_in_memory(tmp_path):
    reference, query = reference_and_query(n_ref=120, n_query=60)
    reference, model = _reference_model(reference)
    query.write_h5ad(tmp_path / "q.h5ad")
    backed = ad.read_h5ad(tmp_path / "q.h5ad", backed="r")
    sv.tl.map_query(backed, model, **FAST)
    sv.tl.map_query(query, model, **FAST)
    assert backed.uns["vae"]["params"]["backed"]
    np.testing.assert_allclose(backed.obsm["X_vae"], query.obsm["X_vae"], atol=1e-6)
    backed.file.close()
    # Other genes: read in blocks of cells, in the model's genes, as in memory.
    subset = query[:, list(query.var_names[2:])[::-1]].copy()
    subset.write_h5ad(tmp_path / "subset.h5ad")
    backed = ad.read_h5ad(tmp_path / "subset.h5ad", backed="r")
    with pytest.warns(UserWarning, match="2 of the model's 40 genes"):
        sv.tl.map_query(backed, model, **FAST)
    with pytest.warns(UserWarning, match="2 of the model's 40 genes"):
        sv.tl.map_query(subset, model, **FAST)
    np.testing.assert_allclose(backed.obsm["X_vae"], subset.obsm["X_vae"], atol=1e-6)
    backed.file.close()


def _failures(tmp_path, query, model):
    """(description, call) pairs that must raise without touching the query."""
    logged = query.copy()
    logged.X = sp.csr_matrix(np.log1p(query.X.toarray()).astype(np.float32) + 0.5)
    nan_batch = query.copy()
    nan_batch.obs["batch"] = pd.Series(["q"] * (query.n_obs - 1) + [None], index=query.obs_names)
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_text("not a model")
    few_genes = query[:, :30].copy()
    return {
        "counts": (logged, lambda a: sv.tl.map_query(a, model, **FAST), ValueError, "counts"),
        "nan batch": (
            nan_batch,
            lambda a: sv.tl.map_query(a, model, **FAST),
            ValueError,
            "missing",
        ),
        "empty": (query, lambda a: sv.tl.map_query(a[:0], model, **FAST), ValueError, "empty"),
        "genes": (few_genes, lambda a: sv.tl.map_query(a, model, **FAST), ValueError, "Only 30"),
        "file": (query, lambda a: sv.tl.map_query(a, not_a_model), ValueError, "not a scvae"),
        "key": (query, lambda a: sv.tl.map_query(a, model, batch_key="nope"), KeyError, "nope"),
        "model": (query, lambda a: sv.tl.map_query(a, "x.h5ad"), FileNotFoundError, "x.h5ad"),
        "lr": (query, lambda a: sv.tl.map_query(a, model, lr=0), ValueError, "lr"),
    }


def test_every_failure_raises_clearly_and_leaves_the_query_unchanged(tmp_path):
    reference, query = reference_and_query(n_ref=120, n_query=40)
    reference, model = _reference_model(reference)
    for name, (adata, call, error, match) in _failures(tmp_path, query, model).items():
        snapshot = _snapshot(adata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(error, match=match):
                call(adata)
        _assert_unchanged(adata, snapshot)
        assert "X_vae" not in adata.obsm, name


def test_a_reference_whose_encoder_does_not_see_the_batch_warns():
    """Trained with encode_covariates=False, or without any batch_key."""
    reference, query = reference_and_query(n_ref=120, n_query=40)
    model = sv.tl.vae(reference, likelihood="nb", batch_key="batch", return_model=True, **FAST)
    with pytest.warns(UserWarning, match="encode_covariates=True"):
        sv.tl.map_query(query, model, **FAST)
    # The codes are the reference encoder's: the batch does not enter them.
    np.testing.assert_allclose(query.obsm["X_vae"], model.encode(query.X), atol=1e-6)
    plain = sv.tl.ae(reference, likelihood="nb", return_model=True, **FAST)
    with pytest.warns(UserWarning, match="without a batch_key"):
        sv.tl.map_query(query, plain, **FAST)
    assert query.uns["ae"]["params"]["epochs"] == 0
    np.testing.assert_array_equal(query.obsm["X_ae"], plain.encode(query))
    with pytest.raises(ValueError, match="without a batch_key"):
        sv.tl.map_query(query, plain, batch_key="batch")


def test_an_extended_model_saves_and_loads_with_the_same_codes(tmp_path):
    reference, query = reference_and_query(n_ref=120, n_query=60)
    reference, model = _reference_model(reference, "vsc", "nb")
    extended = sv.tl.map_query(query, model, return_model=True, **FAST)
    extended.save(tmp_path / "extended.pt")
    loaded = sv.models.load(tmp_path / "extended.pt")
    assert loaded.batch_categories == ["b0", "b1", "q"]
    np.testing.assert_array_equal(loaded.encode(query), query.obsm["X_vsc"])
    np.testing.assert_array_equal(loaded.encode(reference), reference.obsm["X_vsc"])
    # A second query maps onto the extended model as onto any reference.
    second = query.copy()
    second.obs["batch"] = "q2"
    again = sv.tl.map_query(second, loaded, return_model=True, **FAST)
    assert again.batch_categories == ["b0", "b1", "q", "q2"]
    np.testing.assert_array_equal(again.encode(query), query.obsm["X_vsc"])


def _clusters(centres, n, seed, sd=0.7, labels=None):
    rng = np.random.default_rng(seed)
    rep = np.concatenate([c + sd * rng.standard_normal((n, 2)) for c in centres])
    adata = ad.AnnData(np.zeros((len(rep), 1), dtype=np.float32))
    adata.obsm["X_vae"] = rep.astype(np.float32)
    if labels is not None:
        adata.obs["cell_type"] = pd.Categorical(np.repeat(labels, n))
    return adata


def test_transfer_labels_recovers_labels_and_flags_an_absent_population():
    """Four separable types at the corners of a square, and a population the reference lacks
    at its centre: the known types are recovered exactly (uncertainty 0), and 87-100 % of the
    absent population's cells are "Unknown" over six data seeds with 50 neighbours (73-90 %
    with 15: the vote among tail cells of four types is noisier)."""
    corners = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]])
    reference = _clusters(corners, 100, seed=0, labels=["a", "b", "c", "d"])
    query = _clusters(corners, 30, seed=1)
    absent = _clusters([corners.mean(0)], 30, seed=2, sd=0.1)
    query = ad.concat([query, absent], index_unique="-")
    truth = np.repeat(["a", "b", "c", "d"], 30)
    sv.tl.transfer_labels(reference, query, "cell_type", use_rep="X_vae", n_neighbors=50)
    pred = query.obs["cell_type_pred"].to_numpy()
    assert list(query.obs["cell_type_pred"].cat.categories) == ["a", "b", "c", "d", "Unknown"]
    assert (pred[:120] == truth).all()
    # Between four reference types, the absent population's neighbours come from all four:
    # no label holds a weighted majority, so it is "Unknown".
    assert (pred[120:] == "Unknown").mean() >= 0.8
    uncertainty = query.obs["cell_type_uncertainty"].to_numpy()
    assert ((uncertainty >= 0) & (uncertainty <= 1)).all()
    assert np.median(uncertainty[:120]) < 0.05 and uncertainty[120:].mean() > 0.5
    # unknown_threshold=1 never says "Unknown"; key_added renames both columns.
    sv.tl.transfer_labels(
        reference, query, "cell_type", use_rep="X_vae", unknown_threshold=1, key_added="ct"
    )
    assert "Unknown" not in set(query.obs["ct"]) and "ct_uncertainty" in query.obs
    with pytest.raises(KeyError, match="X_pca"):
        sv.tl.transfer_labels(reference, query, "cell_type", use_rep="X_pca")
    with pytest.raises(ValueError, match="unknown_threshold"):
        sv.tl.transfer_labels(reference, query, "cell_type", use_rep="X_vae", unknown_threshold=2)
    with pytest.raises(ValueError, match="n_neighbors"):
        sv.tl.transfer_labels(reference, query, "cell_type", use_rep="X_vae", n_neighbors=1000)


def test_cli_maps_a_query_and_transfers_labels(tmp_path, capsys):
    from scvae_tools.cli import main

    reference, query = reference_and_query(n_ref=120, n_query=60)
    reference.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    train = ["train", "vae", str(tmp_path / "ref.h5ad"), "-o", str(tmp_path / "ref_out.h5ad")]
    train += ["--likelihood", "nb", "--batch-key", "batch", "--encode-covariates"]
    train += ["--epochs", "3", "--quiet", "--save-model", str(tmp_path / "m.pt")]
    assert main(train) == 0
    mapping = ["map", str(tmp_path / "m.pt"), str(tmp_path / "query.h5ad")]
    mapping += ["-o", str(tmp_path / "out.h5ad"), "--batch-key", "batch", "--epochs", "2"]
    mapping += ["--quiet", "--save-model", str(tmp_path / "ext.pt")]
    labels = ["--reference", str(tmp_path / "ref.h5ad"), "--labels-key", "group"]
    assert main([*mapping, *labels]) == 0
    assert "1 new batch(es)" in capsys.readouterr().out
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.uns["vae"]["params"]["new_batch_categories"] == ["q"]
    assert out.obs["group_pred"].dtype == "category"
    assert out.obs["group_uncertainty"].between(0, 1).all()
    extended = sv.models.load(tmp_path / "ext.pt")
    np.testing.assert_array_equal(extended.encode(out), out.obsm["X_vae"])
    assert main([*mapping[:1], str(tmp_path / "query.h5ad"), *mapping[2:]]) == 2
    assert "not a scvae-tools model file" in capsys.readouterr().err
    assert main([*mapping, "--labels-key", "group"]) == 2
    assert "go together" in capsys.readouterr().err


def test_train_batches_only_restores_ordinary_parameters_even_on_error():
    reference, _ = reference_and_query(n_ref=60, n_query=10)
    _, model = _reference_model(reference, "vae", "zinb", epochs=1)
    module = model.with_batches(["q"]).module
    names = [name for name, _ in module.named_parameters()]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match="stop"), module.train_batches_only(2) as trainable:
        # One new column in each weight that reads the batch, nothing else: the encoder's,
        # the shallow decoder's hidden layer (the default with a batch_key), and the output
        # and zero-inflation layers' of the ZINB.
        assert model.config["decoder"] == "shallow"
        assert len(trainable) == len(model.module.batch_columns()) == 4
        assert all(p.shape[1] == 1 for p in trainable)
        raise RuntimeError("stop")
    assert [name for name, _ in module.named_parameters()] == names
    assert all(p.requires_grad for p in module.parameters())
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    with pytest.raises(ValueError, match="first"):
        with module.train_batches_only(3):
            pass
