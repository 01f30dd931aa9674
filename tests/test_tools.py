"""sv.tl.ae / vae / vsc as a scanpy user sees them."""

import inspect
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from _synthetic import SHARED_PBMC3K, knn_fractions, log_adata, two_batch_counts

import scvae_tools as sv
from scvae_tools.models import LatentModel

matplotlib.use("Agg")

TOOLS = {"ae": sv.tl.ae, "vae": sv.tl.vae, "vsc": sv.tl.vsc}
FAST = {"epochs": 3, "batch_size": 64, "progress": False}


def _snapshot(adata):
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return {
        "X": X,
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": set(adata.obsm),
        "uns": set(adata.uns),
        "layers": {k: v.copy() for k, v in adata.layers.items()},
    }


def _assert_unchanged(adata, snap):
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(X, snap["X"])
    assert adata.obs.equals(snap["obs"]) and adata.var.equals(snap["var"])
    assert set(adata.obsm) == snap["obsm"] and set(adata.uns) == snap["uns"]
    for k, v in snap["layers"].items():
        assert (adata.layers[k] != v).nnz == 0


@pytest.mark.parametrize("name", list(TOOLS))
def test_tool_writes_latent_and_record_and_nothing_else(name):
    adata = log_adata()
    snap = _snapshot(adata)
    assert TOOLS[name](adata, **FAST) is None
    rep = adata.obsm[f"X_{name}"]
    assert rep.dtype == np.float32 and rep.shape == (adata.n_obs, 6)
    assert np.isfinite(rep).all() and rep.std(0).min() > 0
    record = adata.uns[name]
    assert record["params"]["epochs"] == 3 and record["params"]["model"] == name
    assert record["params"]["layer"] == "X"
    assert (record["params"]["n_obs"], record["params"]["n_vars"]) == adata.shape
    assert list(record["params"]["hidden"]) == [128, 32, 16]
    history = record["history"]
    assert {"loss", "reconstruction"} <= set(history)
    assert all(len(v) == 3 for v in history.values())
    assert record["training_time_s"] > 0
    new_obsm = {f"X_{name}"} | ({"X_vsc_spike"} if name == "vsc" else set())
    assert set(adata.obsm) == snap["obsm"] | new_obsm
    assert set(adata.uns) == snap["uns"] | {name}
    adata.obsm.clear()
    adata.uns.clear()
    snap["obsm"], snap["uns"] = set(), set()
    _assert_unchanged(adata, snap)


def test_first_activation_shapes_the_encoder_and_is_recorded():
    adata = log_adata()
    default = sv.tl.ae(adata, return_model=True, **FAST)
    relu = sv.tl.ae(adata, first_activation=True, key_added="relu", return_model=True, **FAST)
    assert isinstance(default.module.first_activation, torch.nn.Identity)  # the write-up's
    assert isinstance(relu.module.first_activation, torch.nn.LeakyReLU)  # the AE's activation
    assert adata.uns["ae"]["params"]["first_activation"] is False
    assert adata.uns["relu"]["params"]["first_activation"] is True
    assert not np.allclose(adata.obsm["X_ae"], adata.obsm["relu"])


def _activations(model: LatentModel) -> set[type]:
    kinds = (torch.nn.ReLU, torch.nn.LeakyReLU)
    return {type(m) for m in model.module.modules() if isinstance(m, kinds)}


def test_activation_auto_is_leaky_for_the_ae_only_and_is_recorded():
    adata = log_adata()
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match="`activation` must be one of 'relu', 'leaky_relu', got"):
        sv.tl.ae(adata, activation="tanh", **FAST)
    _assert_unchanged(adata, snap)
    # decoder="mlp" so that the decoder has hidden layers too: every one follows the option.
    opts = {**FAST, "decoder": "mlp", "first_activation": True, "return_model": True}
    ae = sv.tl.ae(adata, **opts)
    relu = sv.tl.ae(adata, activation="relu", key_added="relu", **opts)
    vae = sv.tl.vae(adata, **opts)
    leaky_vae = sv.tl.vae(adata, activation="leaky_relu", key_added="leaky", **opts)
    assert _activations(ae) == {torch.nn.LeakyReLU}
    assert _activations(relu) == {torch.nn.ReLU}
    assert _activations(vae) == {torch.nn.ReLU}
    assert _activations(leaky_vae) == {torch.nn.LeakyReLU}
    n_act = sum(isinstance(m, torch.nn.LeakyReLU) for m in ae.module.modules())
    assert n_act == 1 + 1 + 1 + 3  # first layer, body, the head's hidden layer, decoder
    params = {key: adata.uns[key]["params"]["activation"] for key in ("ae", "relu", "vae", "leaky")}
    assert params == {"ae": "leaky_relu", "relu": "relu", "vae": "relu", "leaky": "leaky_relu"}
    assert not np.allclose(adata.obsm["X_ae"], adata.obsm["relu"])
    # The record is enough to rebuild the model: a save-load round trip keeps the activation.
    assert _activations(LatentModel("ae", adata.var_names, ae.config)) == {torch.nn.LeakyReLU}


def test_a_model_config_without_activation_is_built_with_relus():
    """Models saved before the option was added load as they were trained."""
    model = LatentModel("ae", [f"g{i}" for i in range(30)], {"n_latent": 3, "hidden": [16, 8, 4]})
    assert _activations(model) == {torch.nn.ReLU}


def test_linear_path_auto_is_on_for_one_gaussian_batch_of_the_ae_and_vae():
    adata = two_batch_counts(n_cells=120, n_genes=30)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    snap = _snapshot(adata)
    with pytest.raises(TypeError, match="`linear_path` must be True or False, got 'yes'"):
        sv.tl.ae(adata, linear_path="yes", **FAST)
    _assert_unchanged(adata, snap)
    opts = {**FAST, "return_model": True}
    models = {
        "ae": sv.tl.ae(adata, **opts),
        "vae": sv.tl.vae(adata, **opts),
        "vsc": sv.tl.vsc(adata, **opts),
        "batched": sv.tl.ae(adata, batch_key="batch", key_added="batched", **opts),
        "plain": sv.tl.ae(adata, linear_path=False, key_added="plain", **opts),
        "vsc_path": sv.tl.vsc(adata, linear_path=True, key_added="vsc_path", **opts),
    }
    has_path = {
        key: (model.module.linear_path, adata.uns[key]["params"]["linear_path"])
        for key, model in models.items()
    }
    assert has_path == {
        "ae": (True, True),
        "vae": (True, True),
        "vsc": (False, False),
        "batched": (False, False),
        "plain": (False, False),
        "vsc_path": (True, True),
    }
    ae = models["ae"]
    assert not np.allclose(adata.obsm["X_ae"], adata.obsm["plain"])
    # The path starts at the principal axes: after 3 epochs the AE's code still lies close to
    # a linear map of PCA's (least squares), and the plain AE's does not.
    pcs = sc.pp.pca(adata.X, n_comps=6)
    pcs = np.c_[pcs, np.ones(len(pcs))]

    def explained(rep):
        fit = pcs @ np.linalg.lstsq(pcs, rep, rcond=None)[0]
        return 1 - ((rep - fit) ** 2).sum() / ((rep - rep.mean(0)) ** 2).sum()

    assert explained(adata.obsm["X_ae"]) > 0.95 > explained(adata.obsm["plain"])
    # The record rebuilds the model, path included; a saved model without the key has none.
    rebuilt = LatentModel("ae", adata.var_names, ae.config)
    rebuilt.module.load_state_dict(ae.module.state_dict())
    np.testing.assert_allclose(rebuilt.encode(adata), adata.obsm["X_ae"], rtol=1e-4, atol=1e-5)
    old = LatentModel("ae", [f"g{i}" for i in range(30)], {"n_latent": 3, "hidden": [16, 8, 4]})
    assert not old.module.linear_path
    # Counts: "auto" leaves it off; asked for, it is started on log1p of the counts.
    counts_ae = sv.tl.ae(adata, layer="counts", likelihood="nb", key_added="nb", **opts)
    assert not counts_ae.module.linear_path and not adata.uns["nb"]["params"]["linear_path"]
    counts = sv.tl.vae(adata, layer="counts", likelihood="nb", linear_path=True, **opts)
    assert counts.module.linear_path
    assert np.isfinite(adata.obsm["X_vae"]).all()


def test_first_activation_auto_is_a_relu_for_counts_only():
    adata = log_adata()
    counts = sv.tl.vae(adata, layer="counts", likelihood="nb", return_model=True, **FAST)
    linear = sv.tl.vae(
        adata,
        layer="counts",
        likelihood="nb",
        first_activation=False,
        key_added="linear",
        return_model=True,
        **FAST,
    )
    assert isinstance(counts.module.first_activation, torch.nn.ReLU)
    assert adata.uns["vae"]["params"]["first_activation"] is True
    assert isinstance(linear.module.first_activation, torch.nn.Identity)  # obeyed exactly
    assert adata.uns["linear"]["params"]["first_activation"] is False
    with pytest.raises(TypeError, match=r"first_activation.*'auto'"):
        sv.tl.vae(adata, first_activation="relu", **FAST)


@pytest.mark.parametrize("name", ["vae", "vsc"])
def test_kl_warmup_weighs_the_kl_from_zero_up_to_beta(name):
    adata = log_adata()
    plain = TOOLS[name](adata, beta=3.0, **{**FAST, "epochs": 5})
    TOOLS[name](adata, beta=3.0, kl_warmup=0.5, key_added="warm", **{**FAST, "epochs": 5})
    assert plain is None
    assert adata.uns[name]["params"]["kl_warmup"] == 0.0
    assert adata.uns["warm"]["params"]["kl_warmup"] == 0.5
    # The recorded loss is reconstruction + weight * kl: the weight of each epoch (progress
    # 0, 0.25, 0.5, ... of training) rises linearly to beta at half of training, then stays.
    for key, expected in [(name, [3.0] * 5), ("warm", [0.0, 1.5, 3.0, 3.0, 3.0])]:
        h = adata.uns[key]["history"]
        weight = (h["loss"] - h["reconstruction"]) / h["kl"]
        np.testing.assert_allclose(weight, expected, rtol=1e-3, atol=1e-3)
    assert not np.allclose(adata.obsm[f"X_{name}"], adata.obsm["warm"])


def test_bfloat16_precision_trains_like_float32_and_is_recorded(monkeypatch):
    adata = log_adata()
    sv.tl.vae(adata, **{**FAST, "epochs": 10})
    sv.tl.vae(adata, precision="bfloat16", key_added="bf16", **{**FAST, "epochs": 10})
    assert adata.uns["vae"]["params"]["precision"] == "float32"
    assert adata.uns["bf16"]["params"]["precision"] == "bfloat16"
    assert adata.obsm["bf16"].dtype == np.float32
    # Only the rounding of the output layer's Gram products differs: the same run, closely.
    full, low = adata.uns["vae"]["history"]["loss"], adata.uns["bf16"]["history"]["loss"]
    np.testing.assert_allclose(low, full, rtol=1e-2)
    assert not np.array_equal(low, full)
    corr = np.corrcoef(adata.obsm["X_vae"].ravel(), adata.obsm["bf16"].ravel())[0, 1]
    assert corr > 0.99
    # Without native bfloat16 instructions the option is slower, and the user is told so.
    monkeypatch.setattr(sv.tl._tools, "has_native_bfloat16", lambda device: False)
    with pytest.warns(UserWarning, match="slower than 'float32'"):
        sv.tl.ae(adata, precision="bfloat16", **FAST)


@pytest.mark.parametrize("sparse", [True, False])
def test_output_layer_padding_stays_zero_through_training(sparse):
    adata = log_adata(sparse=sparse)
    # The MLP decoder's 128-wide output layer: 128 + 1 bias column padded to 136.
    layer = sv.tl.vsc(adata, decoder="mlp", return_model=True, **FAST).module.output_layer
    torch.manual_seed(0)  # the initial weights of random_state=0
    init = sv.models.AutoencoderModule(adata.n_vars, "spike_slab").output_layer
    assert layer.packed.shape == (adata.n_vars, 136)
    assert torch.count_nonzero(layer.packed[:, 129:]) == 0
    # ... while W and b did train.
    assert not torch.allclose(layer.weight, init.weight)
    assert not torch.allclose(layer.bias, init.bias)


@pytest.mark.parametrize(
    ("likelihood", "decoder"), [("gaussian", "linear"), ("nb", "linear"), ("gaussian", "shallow")]
)
def test_linear_decoder_starts_with_weights_scaled_by_each_genes_spread(likelihood, decoder):
    adata = two_batch_counts(n_cells=200, n_genes=40) if likelihood == "nb" else log_adata()
    X = adata.X.toarray().astype(np.float64)
    X[:, 3] = X[0, 3]  # a constant gene: its initial weights must be zero
    adata.X = sp.csr_matrix(X.astype(np.float32))
    # A learning rate this small leaves the weights where they started (Adam's steps ~ lr).
    model = sv.tl.vae(
        adata, likelihood=likelihood, decoder=decoder, lr=1e-12, return_model=True, **FAST
    )
    torch.manual_seed(0)  # the initial weights of random_state=0, before any scaling
    fresh = sv.models.AutoencoderModule(adata.n_vars, "gaussian", **model.config)
    weight = model.module.output_layer.weight.detach().double()
    init = fresh.output_layer.weight.detach().double()
    if decoder == "shallow":  # a hidden layer between: PyTorch's initialisation, unscaled
        np.testing.assert_allclose(weight, init, atol=1e-8)
        return
    spread = (np.log1p(X) if likelihood == "nb" else X).std(axis=0)
    assert spread[3] == 0 and torch.all(weight[3].abs() < 1e-9)
    np.testing.assert_allclose(weight, init * torch.from_numpy(spread)[:, None], atol=1e-8)
    # the bias keeps its initialisation
    np.testing.assert_allclose(
        model.module.output_layer.bias.detach(), fresh.output_layer.bias.detach(), atol=1e-8
    )


def test_gene_std_matches_numpy_on_every_format_and_leaves_the_matrix_alone():
    from scvae_tools._data import gene_std

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.5, size=(3000, 7)).astype(np.float32)
    exact = dense.astype(np.float64)
    for X in (dense, sp.csr_matrix(dense), sp.csc_matrix(dense)):
        before = X.copy()
        np.testing.assert_allclose(gene_std(X), exact.std(axis=0), rtol=1e-9)
        np.testing.assert_allclose(gene_std(X, log1p=True), np.log1p(exact).std(axis=0), rtol=1e-9)
        diff = X - before
        assert (abs(diff).sum() if sp.issparse(diff) else np.abs(diff).sum()) == 0
    # More cells than max_rows: a random draw, the same for the same random_state.
    sub = gene_std(dense, max_rows=500, random_state=1)
    assert np.array_equal(sub, gene_std(sp.csr_matrix(dense), max_rows=500, random_state=1))
    assert not np.array_equal(sub, gene_std(dense, max_rows=500, random_state=2))
    np.testing.assert_allclose(sub, exact.std(axis=0), rtol=0.15)


def test_history_terms_per_model():
    adata = log_adata()
    for tool in TOOLS.values():
        tool(adata, **FAST)
    assert set(adata.uns["ae"]["history"]) == {"loss", "reconstruction"}
    assert set(adata.uns["vae"]["history"]) == {"loss", "reconstruction", "kl"}
    assert set(adata.uns["vsc"]["history"]) == {
        "loss",
        "reconstruction",
        "kl",
        "kl_slab",
        "kl_spike",
    }
    h = adata.uns["vae"]["history"]
    np.testing.assert_allclose(h["loss"], h["reconstruction"] + 2.0 * h["kl"], rtol=1e-5)


def test_training_reduces_the_loss():
    adata = log_adata()
    sv.tl.vae(adata, epochs=30, batch_size=64, progress=False)
    loss = adata.uns["vae"]["history"]["loss"]
    assert loss[-1] < 0.8 * loss[0]


def test_latent_separates_groups():
    adata = log_adata(n_cells=300)
    sv.tl.ae(adata, epochs=40, batch_size=64, progress=False)
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    pred = KMeans(3, n_init=10, random_state=0).fit_predict(adata.obsm["X_ae"])
    assert adjusted_rand_score(adata.obs["group"], pred) > 0.8


def test_vsc_spike_probabilities_and_mean():
    adata = log_adata()
    model = sv.tl.vsc(adata, **FAST, return_model=True)
    spike = adata.obsm["X_vsc_spike"]
    assert spike.shape == (adata.n_obs, 6) and spike.min() >= 0 and spike.max() <= 1
    rep, spike2 = model.encode(adata, return_spike=True)
    np.testing.assert_allclose(rep, adata.obsm["X_vsc"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spike2, spike, rtol=1e-5, atol=1e-6)


def test_vsc_beta_is_applied():
    # The write-up's VSC silently trained with beta=1: a larger beta must shrink the KL.
    adata = log_adata()
    kls = {}
    for beta in (0.1, 50.0):
        sv.tl.vsc(adata, beta=beta, epochs=15, batch_size=64, progress=False)
        assert adata.uns["vsc"]["params"]["beta"] == beta
        kls[beta] = adata.uns["vsc"]["history"]["kl"][-1]
    assert kls[50.0] < 0.5 * kls[0.1]


def test_key_added():
    adata = log_adata()
    sv.tl.vsc(adata, key_added="vsc_b4", beta=4.0, **FAST)
    assert {"vsc_b4", "vsc_b4_spike"} <= set(adata.obsm)
    assert "vsc_b4" in adata.uns and "X_vsc" not in adata.obsm and "vsc" not in adata.uns


def test_copy_and_return_model():
    adata = log_adata()
    out = sv.tl.ae(adata, copy=True, **FAST)
    assert isinstance(out, ad.AnnData) and out is not adata
    assert "X_ae" in out.obsm and "X_ae" not in adata.obsm
    model = sv.tl.ae(adata, return_model=True, **FAST)
    assert isinstance(model, LatentModel) and model.n_latent == 6
    both = sv.tl.ae(adata, return_model=True, copy=True, **FAST)
    assert isinstance(both[0], ad.AnnData) and isinstance(both[1], LatentModel)


def test_same_random_state_same_result_and_global_state_untouched():
    adata = log_adata()
    np.random.seed(123)
    torch.manual_seed(123)
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    sv.tl.vsc(adata, random_state=7, **FAST)
    first = adata.obsm["X_vsc"].copy()
    sv.tl.vsc(adata, random_state=7, **FAST)
    np.testing.assert_array_equal(first, adata.obsm["X_vsc"])
    sv.tl.vsc(adata, random_state=8, **FAST)
    assert not np.allclose(first, adata.obsm["X_vsc"])
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("kind", ["csr", "csc", "dense", "int_dense", "view"])
def test_input_formats_agree(kind):
    adata = log_adata()
    sv.tl.ae(adata, **FAST)
    reference = adata.obsm["X_ae"]
    dense = adata.X.toarray()
    if kind == "csr":
        other = adata.copy()
    elif kind == "csc":
        other = ad.AnnData(sp.csc_matrix(adata.X), obs=adata.obs, var=adata.var)
    elif kind == "dense":
        other = ad.AnnData(dense, obs=adata.obs, var=adata.var)
    elif kind == "int_dense":
        other = ad.AnnData((dense * 0).astype(np.int64), obs=adata.obs, var=adata.var)
        other.X[:, :5] = 1
        sv.tl.ae(other, **FAST)
        assert np.isfinite(other.obsm["X_ae"]).all()
        return
    else:
        big = ad.concat([adata, log_adata(seed=1)], index_unique="-")
        other = big[: adata.n_obs]
        other.obs_names = adata.obs_names
    sv.tl.ae(other, **FAST)
    np.testing.assert_allclose(other.obsm["X_ae"], reference, rtol=1e-3, atol=1e-3)


def test_layer_and_backed(tmp_path):
    adata = log_adata()
    adata.layers["lognorm"] = adata.X.copy()
    adata.X = adata.layers["counts"].copy()
    sv.tl.vae(adata, layer="lognorm", **FAST)
    assert adata.uns["vae"]["params"]["layer"] == "lognorm"
    path = tmp_path / "data.h5ad"
    ad.AnnData(adata.layers["lognorm"], obs=adata.obs, var=adata.var).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    sv.tl.vae(backed, **FAST)
    np.testing.assert_array_equal(backed.obsm["X_vae"], adata.obsm["X_vae"])
    backed.file.close()


def test_uns_record_survives_h5ad_round_trip(tmp_path):
    adata = log_adata()
    sv.tl.vsc(adata, **FAST)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsm["X_vsc"], adata.obsm["X_vsc"])
    np.testing.assert_allclose(
        back.uns["vsc"]["history"]["loss"], adata.uns["vsc"]["history"]["loss"]
    )
    assert back.uns["vsc"]["params"]["prior_spike"] == 0.5


def test_progress_bar_and_quiet(capfd):
    adata = log_adata()
    sv.tl.ae(adata, epochs=2, batch_size=64, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    sv.tl.ae(adata, epochs=2, batch_size=64, progress=True)
    out, err = capfd.readouterr()
    assert "sv.tl.ae" in err and "loss=" in err and "2/2" in err


# --- bad input: clear errors, nothing changed -------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"n_latent": 0}, ValueError, "n_latent"),
        ({"n_latent": 2.5}, TypeError, "n_latent"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": -1}, ValueError, "batch_size"),
        ({"hidden": ()}, ValueError, "hidden"),
        ({"hidden": (64, 0)}, ValueError, "hidden"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"prior_spike": 1.0}, ValueError, "prior_spike"),
        ({"prior_spike": 0.0}, ValueError, "prior_spike"),
        ({"device": "tpu9"}, ValueError, "device"),
        ({"key_added": ""}, ValueError, "key_added"),
        ({"first_activation": "yes"}, TypeError, "first_activation"),
        ({"kl_warmup": 1.5}, ValueError, "kl_warmup"),
        ({"kl_warmup": -0.1}, ValueError, "kl_warmup"),
        ({"precision": "float16"}, ValueError, r"precision.*'float32', 'bfloat16'"),
    ],
)
def test_invalid_hyperparameters(options, error, match):
    adata = log_adata()
    snap = _snapshot(adata)
    with pytest.raises(error, match=match):
        sv.tl.vsc(adata, **{**FAST, **options})
    _assert_unchanged(adata, snap)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("sparse", [True, False])
def test_nan_or_inf_input(bad, sparse):
    adata = log_adata(sparse=sparse)
    if sparse:
        adata.X.data[3] = bad
    else:
        adata.X[2, 3] = bad
    snap_obsm = set(adata.obsm)
    with pytest.raises(ValueError, match="NaN or infinite"):
        sv.tl.ae(adata, **FAST)
    assert set(adata.obsm) == snap_obsm and "ae" not in adata.uns


def test_empty_anndata():
    with pytest.raises(ValueError, match="empty"):
        sv.tl.ae(ad.AnnData(np.zeros((0, 5), dtype=np.float32)), **FAST)
    with pytest.raises(ValueError, match="empty"):
        sv.tl.ae(ad.AnnData(np.zeros((5, 0), dtype=np.float32)), **FAST)


def test_missing_layer_lists_present_layers():
    adata = log_adata()
    with pytest.raises(KeyError, match=r"'lognorm' not found.*'counts'"):
        sv.tl.vae(adata, layer="lognorm", **FAST)


def test_not_an_anndata():
    with pytest.raises(TypeError, match="AnnData"):
        sv.tl.ae(np.ones((4, 4)), **FAST)


def test_raw_counts_warn():
    adata = log_adata()
    adata.X = adata.layers["counts"] * 50
    with pytest.warns(UserWarning, match="raw counts"):
        sv.tl.ae(adata, **FAST)


@pytest.mark.filterwarnings("ignore:.*raw counts")
def test_divergence_stops_names_epoch_and_writes_nothing():
    adata = log_adata()
    adata.X = adata.X * 1e18  # squared errors overflow float32
    snap = _snapshot(adata)
    with pytest.raises(sv.TrainingDivergedError, match=r"epoch 1 of 3.*lower learning rate"):
        sv.tl.vae(adata, **FAST)
    _assert_unchanged(adata, snap)


def test_interrupt_leaves_anndata_unchanged(monkeypatch):
    adata = log_adata()
    snap = _snapshot(adata)
    from scvae_tools.models import AutoencoderModule

    calls = {"n": 0}
    original = AutoencoderModule.loss

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderModule, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sv.tl.vsc(adata, **FAST)
    _assert_unchanged(adata, snap)


# --- the fitted model ---------------------------------------------------------------------------


def test_model_encode_save_load(tmp_path):
    adata = log_adata()
    model = sv.tl.vae(adata, return_model=True, **FAST)
    np.testing.assert_allclose(model.encode(adata), adata.obsm["X_vae"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.encode(adata.X), adata.obsm["X_vae"], rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "vae.pt")
    loaded = sv.models.load(tmp_path / "vae.pt")
    assert loaded.kind == "vae" and loaded.var_names == list(adata.var_names)
    np.testing.assert_allclose(loaded.encode(adata), adata.obsm["X_vae"], rtol=1e-5, atol=1e-6)


def test_model_rejects_other_genes():
    adata = log_adata()
    model = sv.tl.ae(adata, return_model=True, **FAST)
    with pytest.raises(ValueError, match=r"genes differ.*1 training gene\(s\) missing"):
        model.encode(adata[:, 1:])
    shuffled = adata[:, ::-1]
    with pytest.raises(ValueError, match="different order"):
        model.encode(shuffled)
    with pytest.raises(ValueError, match="shape"):
        model.encode(np.zeros((3, 5), dtype=np.float32))


# --- scanpy hand-off ----------------------------------------------------------------------------


def test_scanpy_consumes_the_latent():
    adata = log_adata()
    sv.tl.vsc(adata, **FAST)
    sc.tl.tsne(adata, use_rep="X_vsc", perplexity=40)
    assert adata.obsm["X_tsne"].shape == (adata.n_obs, 2)
    assert adata.uns["tsne"]["params"]["use_rep"] == "X_vsc"
    sc.pp.neighbors(adata, use_rep="X_vsc")
    assert adata.obsp["connectivities"].shape == (adata.n_obs, adata.n_obs)
    ax = sc.pl.tsne(adata, color="group", show=False)
    assert ax is not None
    ax = sc.pl.embedding(adata, "vsc", color="group", show=False)
    assert ax.get_xlabel() == "vsc1"


# --- sparse stays sparse ------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_training_never_densifies_a_large_csr():
    # 100,000 x 20,000 would be 8 GB dense (float32); an epoch must run in a small fraction of it.
    script = textwrap.dedent(
        """
        import numpy as np, scipy.sparse as sp, anndata as ad, scvae_tools as sv
        n_obs, n_vars, per_cell = 100_000, 20_000, 10
        rng = np.random.default_rng(0)
        indices = rng.integers(0, n_vars, n_obs * per_cell).astype(np.int32)
        indptr = np.arange(0, n_obs * per_cell + 1, per_cell, dtype=np.int64)
        data = rng.random(n_obs * per_cell, dtype=np.float32)
        X = sp.csr_matrix((data, indices, indptr), shape=(n_obs, n_vars))
        X.sum_duplicates()
        adata = ad.AnnData(X)
        sv.tl.vsc(adata, epochs=1, batch_size=4096, hidden=(16, 8), progress=False)
        assert adata.obsm["X_vsc"].shape == (n_obs, 6)
        # VmHWM belongs to this process's own address space; ru_maxrss would carry the pytest
        # parent's RSS across fork + exec (Linux), so the test would fail for the parent's memory.
        status = open("/proc/self/status").read().split("VmHWM:")[1]
        print(int(status.split()[0]) // 1024)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    peak_mb = int(result.stdout.strip().splitlines()[-1])
    dense_mb = 100_000 * 20_000 * 4 / 2**20
    assert peak_mb < 1500, f"peak RSS {peak_mb} MB (dense would be {dense_mb:.0f} MB)"


# --- real data ----------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHARED_PBMC3K / "pbmc3k_raw.h5ad").exists(),
    reason="PBMC3k test data not found at ../shared/data/pbmc3k (only on developer machines/CI)",
)
def test_pbmc3k_end_to_end():
    adata = ad.read_h5ad(SHARED_PBMC3K / "pbmc3k_raw.h5ad")
    sc.pp.filter_genes(adata, min_cells=3)
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, inplace=True)
    keep = (
        (adata.obs.n_genes_by_counts > 200)
        & (adata.obs.n_genes_by_counts < 2500)
        & (adata.obs.pct_counts_mt < 5)
    )
    adata = adata[keep].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    assert adata.shape == (2638, 13714) and sp.issparse(adata.X)
    for name, tool in TOOLS.items():
        tool(adata, epochs=3, progress=False)
        rep = adata.obsm[f"X_{name}"]
        assert rep.shape == (2638, 6) and np.isfinite(rep).all()
        loss = adata.uns[name]["history"]["loss"]
        assert loss[-1] < loss[0]
    sc.tl.tsne(adata, use_rep="X_vsc", perplexity=40)
    assert adata.obsm["X_tsne"].shape == (2638, 2)


def test_cli_train_writes_the_latent_space_and_the_model(tmp_path, capsys):
    from scvae_tools.cli import main

    adata = log_adata()
    adata.write_h5ad(tmp_path / "in.h5ad")
    args = ["train", "vsc", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad")]
    args += ["--beta", "3", "--kl-warmup", "0.5", "--epochs", "2", "--quiet"]
    args += ["--precision", "bfloat16"]
    assert main([*args, "--save-model", str(tmp_path / "m.pt")]) == 0
    assert "Wrote obsm['X_vsc']" in capsys.readouterr().out
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_vsc"].shape == (adata.n_obs, 6)
    params = out.uns["vsc"]["params"]
    assert (params["beta"], params["kl_warmup"], params["epochs"]) == (3.0, 0.5, 2)
    assert params["precision"] == "bfloat16"
    assert not params["first_activation"]  # "auto" with the Gaussian: the write-up's
    model = sv.models.load(tmp_path / "m.pt")
    assert model.module.kl_warmup == 0.5
    np.testing.assert_allclose(model.encode(out), out.obsm["X_vsc"], rtol=1e-4, atol=1e-5)


# --- count likelihoods and batches ------------------------------------------------------------


@pytest.mark.parametrize(
    ("likelihood", "name"), [("nb", "vae"), ("zinb", "vsc"), ("poisson", "ae"), ("zinb", "vae")]
)
def test_count_likelihood_trains_on_counts_records_and_round_trips(tmp_path, likelihood, name):
    adata = two_batch_counts(n_cells=160, n_genes=40)
    model = TOOLS[name](adata, likelihood=likelihood, batch_key="batch", return_model=True, **FAST)
    record = adata.uns[name]
    assert record["params"]["likelihood"] == likelihood
    assert record["params"]["batch_key"] == "batch"
    assert list(record["params"]["batch_categories"]) == ["b0", "b1"]
    history = record["history"]
    assert np.isfinite(history["reconstruction"]).all() and history["reconstruction"][0] > 0
    rep = adata.obsm[f"X_{name}"]
    assert rep.shape == (adata.n_obs, 6) and np.isfinite(rep).all()
    np.testing.assert_allclose(model.encode(adata), rep, rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "m.pt")
    loaded = sv.models.load(tmp_path / "m.pt")
    assert loaded.likelihood == likelihood and loaded.batch_categories == ["b0", "b1"]
    np.testing.assert_allclose(loaded.encode(adata), rep, rtol=1e-5, atol=1e-6)
    fitted, restored = model.module.state_dict(), loaded.module.state_dict()
    assert list(fitted) == list(restored)
    assert all(torch.equal(fitted[k], restored[k]) for k in fitted)


def test_count_likelihood_on_log_data_raises_and_leaves_anndata_unchanged():
    adata = log_adata()
    snap = _snapshot(adata)
    for name, tool in TOOLS.items():
        with pytest.raises(ValueError, match=r"adata\.X .*non-integer.*layer='counts'"):
            tool(adata, likelihood="nb", **FAST)
        _assert_unchanged(adata, snap)
        assert f"X_{name}" not in adata.obsm
    counts = adata.layers["counts"].copy()
    counts.data[0] = -1.0
    adata.layers["neg"] = counts
    with pytest.raises(ValueError, match=r"adata\.layers\['neg'\] holds 1 negative"):
        sv.tl.vae(adata, layer="neg", likelihood="zinb", **FAST)
    counts = adata.layers["counts"].copy()
    counts.data[0] = np.nan
    adata.layers["nan"] = counts
    with pytest.raises(ValueError, match=r"1 NaN or infinite"):
        sv.tl.vae(adata, layer="nan", likelihood="poisson", **FAST)


def test_count_likelihood_does_not_warn_about_raw_counts():
    adata = log_adata()
    adata.layers["counts"].data[:5] = 500  # "looks like raw counts" for the Gaussian
    with pytest.warns(UserWarning, match="raw counts"):
        sv.tl.ae(adata, layer="counts", **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sv.tl.ae(adata, layer="counts", likelihood="nb", **FAST)


def test_batch_encode_of_new_cells_equals_training_encode():
    adata = two_batch_counts(n_cells=160, n_genes=40)
    model = sv.tl.vae(adata, likelihood="nb", batch_key="batch", return_model=True, **FAST)
    cells = adata.obs_names[adata.obs["batch"] == "b1"][:30]
    new = ad.AnnData(adata[cells].X.copy(), obs=adata[cells].obs.copy(), var=adata.var.copy())
    np.testing.assert_allclose(model.encode(new), adata[cells].obsm["X_vae"], rtol=1e-5, atol=1e-6)
    # The batch column may have another name in the new data.
    new.obs = new.obs.rename(columns={"batch": "sample"})
    np.testing.assert_allclose(
        model.encode(new, batch_key="sample"), adata[cells].obsm["X_vae"], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(KeyError, match=r"batch_key='batch' is not a column.*'sample'"):
        model.encode(new)
    new.obs["sample"] = new.obs["sample"].astype(str)
    new.obs.iloc[:2, new.obs.columns.get_loc("sample")] = "b7"
    with pytest.raises(ValueError, match=r"not trained on: \['b7'\] \(known: \['b0', 'b1'\]\)"):
        model.encode(new, batch_key="sample")


def test_batch_key_errors_leave_anndata_unchanged():
    adata = two_batch_counts(n_cells=80, n_genes=20)
    adata.obs["with_na"] = adata.obs["batch"].astype(object)
    adata.obs.loc[adata.obs_names[:3], "with_na"] = None
    snap = _snapshot(adata)
    with pytest.raises(KeyError, match=r"batch_key='donor' is not a column of adata\.obs"):
        sv.tl.vae(adata, likelihood="nb", batch_key="donor", **FAST)
    with pytest.raises(ValueError, match=r"3 missing value\(s\) \(e\.g\. cells cell0, cell1"):
        sv.tl.vae(adata, likelihood="nb", batch_key="with_na", **FAST)
    with pytest.raises(ValueError, match="`likelihood` must be one of"):
        sv.tl.vae(adata, likelihood="gamma", **FAST)
    _assert_unchanged(adata, snap)


def test_gaussian_with_batches_conditions_the_decoder_and_keeps_the_gram_path():
    adata = log_adata()
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 3 == 0, "a", "b")
    model = sv.tl.ae(adata, batch_key="batch", decoder="mlp", return_model=True, **FAST)
    assert list(adata.uns["ae"]["params"]["batch_categories"]) == ["a", "b"]
    layer = model.module.output_layer
    assert layer.weight.shape == (adata.n_vars, 128 + 2)  # two batch columns beside h
    first = model.module.decoder_body[0]
    assert first.in_features == 6 + 2
    plain = sv.tl.ae(adata, decoder="mlp", return_model=True, copy=True, **FAST)[1]
    assert plain.module.output_layer.weight.shape == (adata.n_vars, 128)


@pytest.mark.parametrize("name", list(TOOLS))
def test_linear_decoder_reads_the_code_directly_and_is_recorded(name):
    adata = log_adata()
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "a", "b")
    mlp = TOOLS[name](adata, decoder="mlp", batch_key="batch", return_model=True, **FAST)
    linear = TOOLS[name](
        adata, decoder="linear", batch_key="batch", key_added="lin", return_model=True, **FAST
    )
    assert adata.uns[name]["params"]["decoder"] == "mlp"
    assert adata.uns["lin"]["params"]["decoder"] == "linear"
    assert len(mlp.module.decoder_body) > 0
    # No hidden layer: the output layer's input is the code and the one-hot batch.
    assert len(linear.module.decoder_body) == 0
    assert linear.module.output_layer.weight.shape == (adata.n_vars, 6 + 2)
    z = torch.randn(5, 6)
    onehot = torch.tensor([[1.0, 0.0]] * 5)
    expected = torch.cat([z, onehot], 1) @ linear.module.output_layer.weight.T
    got = linear.module.reconstruct(z, onehot) - linear.module.output_layer.bias
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(adata.obsm[f"X_{name}"], adata.obsm["lin"])
    # "shallow": one hidden layer as wide as the encoder's first, the batch beside its input.
    shallow = TOOLS[name](
        adata, decoder="shallow", batch_key="batch", key_added="sh", return_model=True, **FAST
    )
    assert adata.uns["sh"]["params"]["decoder"] == "shallow"
    layers = [m for m in shallow.module.decoder_body if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(6 + 2, 128)]
    assert shallow.module.output_layer.weight.shape == (adata.n_vars, 128 + 2)
    # The default, "auto": linear for one sample, shallow with batches; params say which.
    assert inspect.signature(TOOLS[name]).parameters["decoder"].default == "auto"
    one = TOOLS[name](adata, key_added="one", return_model=True, **FAST)
    assert adata.uns["one"]["params"]["decoder"] == "linear"
    assert len(one.module.decoder_body) == 0
    two = TOOLS[name](adata, batch_key="batch", key_added="two", return_model=True, **FAST)
    assert adata.uns["two"]["params"]["decoder"] == "shallow"
    assert len([m for m in two.module.decoder_body if isinstance(m, torch.nn.Linear)]) == 1
    with pytest.raises(ValueError, match="`decoder` must be one of"):
        TOOLS[name](adata, decoder="deep", **FAST)


def test_encode_covariates_feeds_the_batch_to_the_encoder_and_is_recorded(tmp_path):
    adata = two_batch_counts(n_cells=120, n_genes=30)
    kw = {"likelihood": "nb", "batch_key": "batch", "return_model": True, **FAST}
    plain = sv.tl.vae(adata, **kw)
    seen = sv.tl.vae(adata, encode_covariates=True, key_added="enc", **kw)
    assert adata.uns["vae"]["params"]["encode_covariates"] is False
    assert adata.uns["enc"]["params"]["encode_covariates"] is True
    assert plain.module.input_covariates is None
    assert seen.module.input_covariates.weight.shape == (128, 2)
    # The code of a cell depends on the batch it is said to come from.
    swapped = adata.copy()
    swapped.obs["batch"] = swapped.obs["batch"].map({"b0": "b1", "b1": "b0"})
    assert not np.allclose(seen.encode(swapped), adata.obsm["enc"])
    np.testing.assert_allclose(plain.encode(swapped), adata.obsm["X_vae"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="encoder sees each cell's batch"):
        seen.encode(adata.X)
    seen.save(tmp_path / "enc.pt")
    loaded = sv.models.load(tmp_path / "enc.pt")
    np.testing.assert_allclose(loaded.encode(adata), adata.obsm["enc"], rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="encode_covariates"):
        sv.tl.vae(adata, encode_covariates="yes", **FAST)


def test_batch_aware_vae_mixes_batches_and_keeps_labels_apart():
    """Two batches with a strong gene-wise effect: without ``batch_key`` the latent space
    splits by batch (almost no kNN from the other batch); with it, cells of a type mix
    (0.38-0.40 of the neighbours from the other batch over three data seeds, 0.5 is perfect)
    while the types stay apart."""
    adata = two_batch_counts()
    scores = {}
    for key in (None, "batch"):
        sv.tl.vae(adata, likelihood="nb", batch_key=key, epochs=150, batch_size=64, progress=False)
        scores[key] = knn_fractions(adata.obsm["X_vae"], adata.obs)
    (mix_plain, purity_plain), (mix_batch, purity_batch) = scores[None], scores["batch"]
    assert mix_plain < 0.1 and purity_plain > 0.9, scores
    assert mix_batch > mix_plain + 0.2, scores
    assert purity_batch > 0.9, scores


def test_cli_train_with_likelihood_and_batch_key(tmp_path, capsys):
    from scvae_tools.cli import main

    two_batch_counts(n_cells=120, n_genes=30).write_h5ad(tmp_path / "in.h5ad")
    args = ["train", "vae", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad")]
    args += ["--likelihood", "zinb", "--batch-key", "batch", "--epochs", "2", "--quiet"]
    assert main([*args, "--save-model", str(tmp_path / "m.pt")]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.uns["vae"]["params"]["likelihood"] == "zinb"
    assert list(out.uns["vae"]["params"]["batch_categories"]) == ["b0", "b1"]
    assert out.uns["vae"]["params"]["first_activation"]  # "auto" with counts
    model = sv.models.load(tmp_path / "m.pt")
    assert isinstance(model.module.first_activation, torch.nn.ReLU)
    np.testing.assert_allclose(model.encode(out), out.obsm["X_vae"], rtol=1e-4, atol=1e-5)
    assert main([*args, "--no-first-activation"]) == 0
    assert not ad.read_h5ad(tmp_path / "out.h5ad").uns["vae"]["params"]["first_activation"]
    # Unset, --decoder and --encode-covariates leave the tools' defaults; set, they are obeyed.
    defaults = inspect.signature(sv.tl.vae).parameters
    for flags, decoder, encode, activation in (
        ([], "shallow", defaults["encode_covariates"].default, "relu"),  # "auto"s
        (["--decoder", "mlp", "--encode-covariates"], "mlp", True, "relu"),
        (["--decoder", "linear", "--no-encode-covariates"], "linear", False, "relu"),
        (["--activation", "leaky_relu"], "shallow", False, "leaky_relu"),
    ):
        assert main([*args, *flags]) == 0
        params = ad.read_h5ad(tmp_path / "out.h5ad").uns["vae"]["params"]
        got = (params["decoder"], bool(params["encode_covariates"]), params["activation"])
        assert got == (decoder, encode, activation)
        assert not params["linear_path"]  # "auto": not with a batch_key
    assert main([*args, "--linear-path"]) == 0
    assert ad.read_h5ad(tmp_path / "out.h5ad").uns["vae"]["params"]["linear_path"]
    assert main([*args[:5], "--likelihood", "nb", "--batch-key", "nope", "--quiet"]) == 2
    assert "not a column" in capsys.readouterr().err


def test_principal_axes_match_an_svd_on_every_format_and_leave_the_matrix_alone():
    from scvae_tools._data import principal_axes

    rng = np.random.default_rng(0)
    dense = (rng.poisson(0.5, size=(300, 12)) * rng.uniform(0.5, 3, size=12)).astype(np.float32)
    centred = dense - dense.mean(0)
    _, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    for X in (dense, sp.csr_matrix(dense), sp.csc_matrix(dense)):
        before = X.copy()
        mean, axes, variance = principal_axes(X, 3)
        np.testing.assert_allclose(mean, dense.mean(0), rtol=1e-5)
        # Each axis up to its sign; the variance of the scores along it (n - 1 in scanpy).
        np.testing.assert_allclose(np.abs((axes * vt[:3]).sum(1)), 1.0, atol=1e-4)
        np.testing.assert_allclose(variance, s[:3] ** 2 / (len(dense) - 1), rtol=1e-4)
        diff = X - before
        assert (abs(diff).sum() if sp.issparse(diff) else np.abs(diff).sum()) == 0
    # Fewer cells than axes: the axes beyond the rank are zeros.
    _, tiny, tiny_var = principal_axes(dense[:4], 6)
    vt4 = np.linalg.svd(dense[:4] - dense[:4].mean(0), full_matrices=False)[2]
    np.testing.assert_allclose(np.abs((tiny[:3] * vt4[:3]).sum(1)), 1.0, atol=1e-4)
    assert not tiny[3:].any() and not tiny_var[3:].any() and tiny_var[2] > 0
    _, logged, _ = principal_axes(dense, 2, log1p=True)
    _, _, vt_log = np.linalg.svd(np.log1p(dense) - np.log1p(dense).mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs((logged * vt_log[:2]).sum(1)), 1.0, atol=1e-4)
