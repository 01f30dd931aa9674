"""The likelihoods: count log-likelihoods against torch.distributions, sparse equal to dense."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.distributions import NegativeBinomial, Poisson

from scvae_tools._data import to_batch
from scvae_tools.models import (
    LIKELIHOODS,
    AutoencoderModule,
    NegativeBinomialLikelihood,
    OutputLinear,
    PoissonLikelihood,
    ZINBLikelihood,
    squared_error_gram,
)
from scvae_tools.models._latent import GaussianLatent
from scvae_tools.models._nn import InputLinear, mlp, output_products

N_CELLS, N_GENES = 30, 50


def _counts(seed=0):
    """Counts with many zeros, an empty cell, and a few large values."""
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(0.5, 0.1, size=(N_CELLS, N_GENES)).astype(np.float32)
    x[rng.random(x.shape) < 0.6] = 0
    x[3] = 0
    x[0, :3] = [1000, 5000, 20000]
    return x


def _params(likelihood, seed=1):
    gen = torch.Generator().manual_seed(seed)
    log_mu = torch.randn(N_CELLS, N_GENES, generator=gen) * 2
    params = {"log_mu": log_mu}
    if not isinstance(likelihood, PoissonLikelihood):
        params["log_theta"] = torch.randn(N_GENES, generator=gen)
    if isinstance(likelihood, ZINBLikelihood):
        params["dropout_logits"] = torch.randn(N_CELLS, N_GENES, generator=gen) * 2
    return params


def _reference(name, x, p):
    mu = p["log_mu"].exp()
    if name == "poisson":
        return Poisson(mu).log_prob(x)
    theta = p["log_theta"].exp()
    # torch's NegativeBinomial counts successes with odds exp(logits): mean theta * exp(logits).
    nb = NegativeBinomial(total_count=theta.expand_as(mu), logits=p["log_mu"] - p["log_theta"])
    log_nb = nb.log_prob(x)
    if name == "nb":
        return log_nb
    pi = torch.sigmoid(p["dropout_logits"])
    zero = torch.log(pi + (1 - pi) * log_nb.exp())
    return torch.where(x > 0, torch.log1p(-pi) + log_nb, zero)


@pytest.mark.parametrize("name", ["nb", "zinb", "poisson"])
def test_count_log_prob_matches_torch_distributions(name):
    likelihood = LIKELIHOODS[name](8, N_GENES)
    x = torch.from_numpy(_counts())
    p = {k: v.double() for k, v in _params(likelihood).items()}
    got = likelihood.log_prob(x.double(), p)
    torch.testing.assert_close(got, _reference(name, x.double(), p), rtol=1e-9, atol=1e-9)
    # The zero term alone is log p(0) at every entry.
    zeros = torch.zeros_like(x).double()
    torch.testing.assert_close(
        likelihood.log_prob_zero(p), _reference(name, zeros, p), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("name", ["nb", "zinb", "poisson"])
def test_sparse_log_likelihood_equals_dense_with_gradients(name):
    likelihood = LIKELIHOODS[name](8, N_GENES)
    x = _counts(seed=2)
    p0 = _params(likelihood, seed=3)
    results = []
    for block in (sp.csr_matrix(x), x):
        p = {k: v.clone().requires_grad_() for k, v in p0.items()}
        ll = likelihood.log_likelihood(to_batch(block, for_training=True), p)
        results.append((ll, torch.autograd.grad(ll.sum(), list(p.values()))))
    (sparse_ll, sparse_grads), (dense_ll, dense_grads) = results
    torch.testing.assert_close(sparse_ll, dense_ll, rtol=1e-5, atol=1e-3)
    for got, want in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # And both are the elementwise reference, summed over genes.
    want = _reference(name, torch.from_numpy(x).double(), {k: v.double() for k, v in p0.items()})
    torch.testing.assert_close(dense_ll.double(), want.sum(1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", ["nb", "zinb", "poisson"])
def test_count_loss_uses_the_observed_library_size(name):
    torch.manual_seed(0)
    likelihood = LIKELIHOODS[name](8, N_GENES)
    x = _counts(seed=4)
    h = torch.randn(N_CELLS, 8)
    nll = likelihood(to_batch(sp.csr_matrix(x)), h)
    library = torch.from_numpy(x.sum(1)).clamp(min=1)
    params = likelihood.parameters_of(h, None, library.log())
    torch.testing.assert_close(
        params["log_mu"].exp().sum(1), library, rtol=1e-5, atol=1e-3
    )  # the mean is proportions times the library size
    torch.testing.assert_close(
        nll, -likelihood.log_likelihood(to_batch(x), params), rtol=1e-4, atol=1e-3
    )
    mean = likelihood.mean(h, None, library)
    torch.testing.assert_close(mean, params["log_mu"].exp())


def test_count_likelihoods_feed_log1p_counts_to_the_encoder_on_the_same_pattern():
    x = _counts(seed=5)
    batch = to_batch(sp.csr_matrix(x), for_training=True)
    seen = NegativeBinomialLikelihood(8, N_GENES).encoder_input(batch)
    assert seen.indices is batch.indices
    np.testing.assert_allclose(seen.transposed.to_dense().T.numpy(), np.log1p(x), rtol=1e-6)
    weight = torch.randn(N_GENES, 4)
    torch.testing.assert_close(seen.matmul(weight), torch.log1p(torch.from_numpy(x)) @ weight)
    torch.testing.assert_close(batch.values, torch.from_numpy(x[x > 0]))  # the loss keeps counts


def _old_state(n_genes, n_latent, hidden):
    """The parameters the previous version's constructor drew under seed 0, in order."""
    torch.manual_seed(0)
    modules = {
        "input_layer": InputLinear(n_genes, hidden[0]),
        "encoder_body": mlp(hidden[:-1], last_activation=True),
        "latent": GaussianLatent(hidden[-2], hidden[-1:], n_latent),
        "decoder_body": mlp([n_latent, *reversed(hidden)], last_activation=True),
        "output_layer": OutputLinear(hidden[0], n_genes),
    }
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("sparse", [True, False])
def test_gaussian_without_batches_is_exactly_the_old_loss_path(sparse):
    """``likelihood="gaussian"``, no batch: the same weights and the same arithmetic as before.

    The old module's parts (decoder ``mlp``, a bare ``OutputLinear``, the Gram-form squared
    error) drawn from the same seed give bit-identical parameters, loss and gradients.
    """
    x = np.log1p(_counts(seed=6))
    batch = to_batch(sp.csr_matrix(x) if sparse else x, for_training=True)
    hidden = (16, 8, 4)
    old = _old_state(N_GENES, n_latent=3, hidden=hidden)
    torch.manual_seed(0)
    module = AutoencoderModule(N_GENES, "gaussian", n_latent=3, hidden=hidden)
    state = module.state_dict()
    assert list(state) == [k.replace("output_layer", "likelihood.output_layer") for k in old]
    for key, value in old.items():
        assert torch.equal(state[key.replace("output_layer", "likelihood.output_layer")], value)

    z = torch.randn(N_CELLS, 3)
    decoder = mlp([3, *reversed(hidden)], last_activation=True)
    decoder.load_state_dict(module.decoder_body.state_dict())
    packed = module.output_layer.packed
    h, old_h = module.generative(z), decoder(z)
    assert torch.equal(h, old_h)
    recon = module.reconstruction_loss(batch, h)
    xw, g = output_products(batch, packed)
    old_recon = squared_error_gram(batch.sq_norm, xw, module.output_layer.augment(old_h), g)
    assert torch.equal(recon, old_recon)
    grads = torch.autograd.grad(recon.sum(), [packed, *module.decoder_body.parameters()])
    old_grads = torch.autograd.grad(old_recon.sum(), [packed, *decoder.parameters()])
    for got, want in zip(grads, old_grads, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["nb", "zinb", "poisson"])
def test_fused_sparse_loss_equals_the_dense_formulas_with_gradients(name):
    """The sparse training path (a hand-written backward for NB/ZINB) against autograd."""
    torch.manual_seed(0)
    likelihood = LIKELIHOODS[name](8, N_GENES, n_covariates=2)
    with torch.no_grad():
        for p in likelihood.parameters():
            p.normal_(0, 0.5)
    x = _counts(seed=7)
    h = torch.randn(N_CELLS, 8)
    covariates = torch.eye(2)[torch.arange(N_CELLS) % 2]
    results = []
    for block in (sp.csr_matrix(x), x):
        batch = to_batch(block, for_training=True)
        batch.covariates = covariates
        hh = h.clone().requires_grad_()
        nll = likelihood(batch, hh)
        wrt = [hh, *likelihood.parameters()]
        results.append((nll, torch.autograd.grad(nll.sum(), wrt)))
    (sparse, sparse_grads), (dense, dense_grads) = results
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-3)
    for got, want in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
