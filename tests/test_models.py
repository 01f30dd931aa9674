"""The torch side: loss terms, the Gram identity, the sparse first layer, the latent layers."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from scvae_tools import _data
from scvae_tools._data import to_batch
from scvae_tools.models import (
    AutoencoderModule,
    SpikeSlabLatent,
    bernoulli_kl,
    gaussian_kl,
    spike_slab_kl,
    squared_error,
)


def _sparse_block(seed=0, n_cells=40, n_genes=30):
    rng = np.random.default_rng(seed)
    dense = rng.random((n_cells, n_genes)).astype(np.float32)
    dense[dense < 0.7] = 0
    dense[5] = 0  # an empty cell
    return sp.csr_matrix(dense), dense


@pytest.mark.parametrize("sparse", [True, False])
def test_gram_reconstruction_equals_dense_squared_error(sparse):
    csr, dense = _sparse_block()
    torch.manual_seed(0)
    module = AutoencoderModule(dense.shape[1], "deterministic", n_latent=3, hidden=(16, 8, 4))
    h = torch.randn(dense.shape[0], 16, requires_grad=True)
    batch = to_batch(csr if sparse else dense, for_training=True)
    gram_loss = module.reconstruction_loss(batch, h)
    reference = squared_error(torch.from_numpy(dense), module.output_layer(h))
    torch.testing.assert_close(gram_loss, reference, rtol=1e-4, atol=1e-4)
    # The gradients are the same too, for the weights and for the hidden layer.
    wrt = [h, module.output_layer.packed]
    grads = torch.autograd.grad(gram_loss.sum(), wrt)
    ref_grads = torch.autograd.grad(reference.sum(), wrt)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sparse", [True, False])
def test_bfloat16_output_products_agree_with_float32_to_bfloat16_rounding(sparse):
    csr, dense = _sparse_block(seed=4, n_cells=64, n_genes=300)
    torch.manual_seed(0)
    module = AutoencoderModule(dense.shape[1], "deterministic", n_latent=3, hidden=(16, 8, 4))
    h = torch.randn(dense.shape[0], 16, requires_grad=True)
    batch = to_batch(csr if sparse else dense, for_training=True)
    wrt = [h, module.output_layer.packed]
    results = {}
    for dtype in (None, torch.bfloat16):
        loss = module.reconstruction_loss(batch, h, dtype)
        assert loss.dtype == torch.float32
        results[dtype] = (loss, *torch.autograd.grad(loss.sum(), wrt))
    for got, want in zip(results[torch.bfloat16], results[None], strict=True):
        assert got.dtype == want.dtype == torch.float32
        # bfloat16 keeps 8 bits of mantissa: agreement to a few parts per thousand of the
        # largest entry, not to float32's 1e-6.
        scale = want.abs().max()
        assert (got - want).abs().max() < 1e-2 * scale
        assert not torch.equal(got, want)


def test_sparse_first_layer_matches_dense_in_value_and_gradient():
    csr, dense = _sparse_block(seed=1)
    weight = torch.randn(dense.shape[1], 5, requires_grad=True)
    out = to_batch(csr, for_training=True).matmul(weight)
    (grad,) = torch.autograd.grad((out**2).sum(), weight)
    ref = torch.from_numpy(dense) @ weight
    (ref_grad,) = torch.autograd.grad((ref**2).sum(), weight)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_batch_norms_include_empty_cells():
    csr, dense = _sparse_block(seed=2)
    batch = to_batch(csr)
    np.testing.assert_allclose(batch.sq_norm.numpy(), (dense**2).sum(1), rtol=1e-5)
    assert batch.sq_norm[5] == 0


@pytest.mark.parametrize("cut_ahead", [1, 150, 1 << 22])
def test_loader_epoch_visits_every_cell_once_in_the_drawn_order(monkeypatch, cut_ahead):
    # Batches are cut a few at a time (up to _CUT_AHEAD_VALUES); that must not change them.
    monkeypatch.setattr(_data, "_CUT_AHEAD_VALUES", cut_ahead)
    _, dense = _sparse_block(seed=3, n_cells=45)
    dense[:, 0] = np.arange(45) + 1  # the cell's number, to recognise it in a batch
    loader = _data.MinibatchLoader(sp.csr_matrix(dense), batch_size=8)
    batches = list(loader.epoch(np.random.default_rng(0)))
    order = np.random.default_rng(0).permutation(45)
    assert [b.n_cells for b in batches] == [8] * 5 + [5]
    for i, batch in enumerate(batches):
        cells = batch.matmul(torch.eye(30)[:, :1])[:, 0].numpy() - 1
        np.testing.assert_array_equal(cells, np.sort(order[8 * i : 8 * i + 8]))
        torch.testing.assert_close(
            batch.sq_norm, torch.from_numpy((dense[cells.astype(int)] ** 2).sum(1))
        )


def test_gaussian_kl_matches_torch_distributions():
    mu, log_sigma = torch.randn(7, 4), torch.randn(7, 4) * 0.5
    expected = kl_divergence(Normal(mu, log_sigma.exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, log_sigma), expected)


def test_bernoulli_kl_matches_torch_distributions():
    gamma = torch.rand(7, 4) * 0.98 + 0.01
    expected = kl_divergence(Bernoulli(probs=gamma), Bernoulli(probs=torch.tensor(0.2))).sum(-1)
    torch.testing.assert_close(bernoulli_kl(gamma, 0.2), expected, rtol=1e-5, atol=1e-5)


def test_spike_slab_kl_splits_into_weighted_slab_and_spike():
    mu, log_sigma, logits = torch.randn(6, 3), torch.randn(6, 3) * 0.3, torch.randn(6, 3)
    slab, spike = spike_slab_kl(mu, log_sigma, logits, alpha=0.5)
    gamma = torch.sigmoid(logits)
    per_dim = kl_divergence(Normal(mu, log_sigma.exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(slab, (gamma * per_dim).sum(-1))
    torch.testing.assert_close(spike, bernoulli_kl(gamma, 0.5))
    # A dimension that is surely on (gamma -> 1) costs the Gaussian KL plus log(1 / alpha).
    slab1, spike1 = spike_slab_kl(mu, log_sigma, torch.full_like(logits, 30.0), alpha=0.25)
    torch.testing.assert_close(slab1, per_dim.sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(spike1, torch.full((6,), 3 * np.log(4.0)), rtol=1e-3, atol=1e-3)


def test_spike_probabilities_keep_their_gradient_when_nearly_on():
    # The paper's log(gamma) = -relu(-v) has zero gradient once gamma = 1; ours does not.
    latent = SpikeSlabLatent(4, (), 3)
    h = torch.randn(8, 4)
    with torch.no_grad():
        latent.heads["spike_logits"][-1].bias.fill_(6.0)  # gamma ~ 0.998
    out = latent(h)
    loss = out.kl["kl_spike"].sum() + out.z.pow(2).sum()
    grad = torch.autograd.grad(loss, latent.heads["spike_logits"][-1].bias)[0]
    assert torch.all(grad.abs() > 0)


def test_sharpness_warms_up_from_50_to_200():
    latent = SpikeSlabLatent(4, (), 2)
    latent.set_progress(0.0)
    assert latent.sharpness == 50
    latent.set_progress(0.5)
    assert latent.sharpness == 125
    latent.set_progress(1.0)
    assert latent.sharpness == 200


@pytest.mark.parametrize("latent", ["gaussian", "spike_slab"])
def test_beta_multiplies_the_whole_kl(latent):
    csr, dense = _sparse_block(seed=3)
    batch = to_batch(csr, for_training=True)
    losses = {}
    for beta in (0.0, 1.0, 5.0):
        torch.manual_seed(0)
        module = AutoencoderModule(dense.shape[1], latent, hidden=(16, 8, 4), beta=beta)
        g = torch.Generator().manual_seed(1)
        losses[beta] = module.loss(batch, g)
    for beta, terms in losses.items():
        torch.testing.assert_close(terms["loss"], terms["reconstruction"] + beta * terms["kl"])
        if latent == "spike_slab":
            torch.testing.assert_close(terms["kl"], terms["kl_slab"] + terms["kl_spike"])
    assert losses[5.0]["loss"] > losses[1.0]["loss"] > losses[0.0]["loss"]


def test_architecture_follows_the_write_up():
    module = AutoencoderModule(100, "spike_slab")
    assert module.input_layer.weight.shape == (100, 128)
    assert isinstance(module.first_activation, torch.nn.Identity)  # linear first layer
    widths = [m.out_features for m in module.encoder_body if isinstance(m, torch.nn.Linear)]
    assert widths == [32]
    assert set(module.latent.heads) == {"mu", "log_sigma", "spike_logits"}
    head = [m.out_features for m in module.latent.heads["mu"] if isinstance(m, torch.nn.Linear)]
    assert head == [16, 6]
    dec = [m.out_features for m in module.decoder_body if isinstance(m, torch.nn.Linear)]
    assert dec == [16, 32, 128]
    assert module.output_layer.weight.shape == (100, 128)
    assert module.output_layer.bias.shape == (100,)
    assert module.output_layer.packed.shape == (100, 136)  # [W b], padded to a multiple of 8


@pytest.mark.parametrize("sparse", [True, False])
def test_gram_squared_error_with_batch_columns_equals_dense(sparse):
    """With a batch one-hot, ``[h c 1 0]`` against the packed ``[W b 0]``: still exact."""
    csr, dense = _sparse_block(seed=5)
    torch.manual_seed(0)
    module = AutoencoderModule(dense.shape[1], "gaussian", hidden=(16, 8, 4), n_batches=3)
    assert module.output_layer.packed.shape == (dense.shape[1], 24)  # 16 + 3 + 1, padded
    batch = to_batch(csr if sparse else dense, for_training=True)
    batch.covariates = torch.eye(3)[torch.arange(dense.shape[0]) % 3]
    h = torch.randn(dense.shape[0], 16, requires_grad=True)
    loss = module.reconstruction_loss(batch, h)
    reference = squared_error(torch.from_numpy(dense), module.output_layer(h, batch.covariates))
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-4)
    wrt = [h, module.output_layer.packed]
    for got, want in zip(
        torch.autograd.grad(loss.sum(), wrt), torch.autograd.grad(reference.sum(), wrt), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Each decoder layer sees the one-hot beside its input, as in scVI.
    widths = [m.in_features for m in module.decoder_body if isinstance(m, torch.nn.Linear)]
    assert widths == [6 + 3, 4 + 3, 8 + 3]


def test_loads_a_format_1_model_file(tmp_path):
    """Files written before the likelihoods (output layer on the module) still load."""
    import scvae_tools as sv

    torch.manual_seed(0)
    config = {"n_latent": 3, "hidden": [16, 8, 4]}
    model = sv.models.LatentModel("vae", [f"g{i}" for i in range(30)], config)
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["format_version"] = 1
    del payload["batch_key"], payload["batch_categories"]
    payload["state_dict"] = {
        k.removeprefix("likelihood."): v for k, v in payload["state_dict"].items()
    }
    assert "output_layer.packed" in payload["state_dict"]
    torch.save(payload, tmp_path / "old.pt")
    loaded = sv.models.load(tmp_path / "old.pt")
    X = np.abs(np.random.default_rng(0).normal(size=(20, 30))).astype(np.float32)
    np.testing.assert_array_equal(loaded.encode(X), model.encode(X))


def test_adam_moments_of_idle_weights_are_zeroed_before_they_turn_subnormal():
    from scvae_tools._training import _SWEEP_STEPS, zero_negligible_moments

    weight = torch.nn.Parameter(torch.ones(100))
    optimizer = torch.optim.Adam([weight], lr=1e-3)
    weight.grad = torch.ones(100)
    optimizer.step()
    tiny = torch.finfo(torch.float32).tiny
    # The weight never gets a gradient again (a switched-off unit): its first moment decays
    # by 0.9 per step and would be subnormal from about step 810 to step 960.
    for step in range(1, 1200):
        weight.grad = torch.zeros(100)
        optimizer.step()
        if step % _SWEEP_STEPS == 0:
            zero_negligible_moments(optimizer)
        for moment in optimizer.state[weight].values():
            if moment.dim():
                assert not ((moment != 0) & (moment.abs() < tiny)).any(), step
    assert optimizer.state[weight]["exp_avg"].abs().max() == 0


@pytest.mark.parametrize("latent", ["deterministic", "gaussian", "spike_slab"])
def test_linear_path_starts_the_code_at_the_principal_axes(latent):
    torch.manual_seed(0)
    n_genes, k = 40, 3
    x = np.random.default_rng(0).poisson(1.0, size=(50, n_genes)).astype(np.float32)
    module = AutoencoderModule(n_genes, latent, n_latent=k, linear_path=True)
    head = module.latent.heads[module.latent.location_head]
    assert not head[-1].weight.any() and not head[-1].bias.any()  # the residual starts at zero
    components = torch.linalg.qr(torch.randn(n_genes, k)).Q.T
    center = torch.from_numpy(x.mean(0))
    module.init_linear_path(components, center, scale=0.5)
    for X in (x, sp.csr_matrix(x)):
        out = module.encode(to_batch(X))
        location = out.extras.get("mu", out.mean)  # the VSC's mean is gated by its spikes
        expected = 0.5 * (torch.from_numpy(x) - center) @ components.T
        torch.testing.assert_close(location, expected, atol=1e-5, rtol=1e-5)
    # Off (the default), the module has no path and its location head is PyTorch's draw.
    plain = AutoencoderModule(n_genes, latent, n_latent=k)
    assert not plain.linear_path
    assert plain.input_layer.weight.shape == (n_genes, 128)
    assert plain.latent.heads[plain.latent.location_head][-1].weight.any()
    with pytest.raises(ValueError, match="no linear path"):
        plain.init_linear_path(components, center)
