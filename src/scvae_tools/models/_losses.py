r"""Loss terms of the three models, one short function each.

All functions return one value per cell (shape ``(n_cells,)``); the training loop averages them
over the cells of a minibatch. The total objective of a cell is

.. math::

    \\mathcal{L}(x) = \\lVert x - \\hat{x} \\rVert^2 + \\beta \\, \\mathrm{KL}(x),

so ``beta`` weighs the KL of one cell against the summed squared error of that cell over all genes.
"""

from __future__ import annotations

import torch

__all__ = [
    "bernoulli_kl",
    "gaussian_kl",
    "spike_selection",
    "spike_slab_kl",
    "squared_error",
    "squared_error_gram",
]

_EPS = 1e-6


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    r"""Summed squared error over genes, :math:`\sum_g (x_g - \hat{x}_g)^2`.

    Parameters
    ----------
    x, x_hat
        Observed and reconstructed values, shape ``(n_cells, n_genes)``.

    Returns
    -------
    Shape ``(n_cells,)``.
    """
    return (x - x_hat).pow(2).sum(dim=-1)


def squared_error_gram(
    x_sq_norm: torch.Tensor,
    x_dot_weight: torch.Tensor,
    h: torch.Tensor,
    gram: torch.Tensor,
) -> torch.Tensor:
    r"""The same summed squared error, without ever forming the dense reconstruction.

    With an affine output layer :math:`\hat{x} = W h + b`, write :math:`\tilde{W} = [W \; b]`
    (``n_genes x (n_hidden + 1)``) and :math:`\tilde{h} = [h; 1]`. Then

    .. math::

        \lVert x - \hat{x} \rVert^2 = \lVert x \rVert^2 - 2\,(x^\top \tilde{W})\,\tilde{h}
        + \tilde{h}^\top (\tilde{W}^\top \tilde{W})\,\tilde{h}.

    :math:`x^\top \tilde{W}` costs one multiply per non-zero of a sparse :math:`x`, and the Gram
    matrix :math:`\tilde{W}^\top \tilde{W}` is computed once per minibatch, so the cost no longer
    grows with ``n_cells x n_genes``. The value and its gradients are exact. Zero columns
    appended to :math:`\tilde{W}`, with matching zeros in :math:`\tilde{h}`, change nothing
    (:class:`~scvae_tools.models.OutputLinear` pads its width to a multiple of 8).

    Parameters
    ----------
    x_sq_norm
        :math:`\lVert x \rVert^2` per cell, shape ``(n_cells,)``.
    x_dot_weight
        :math:`x^\top \tilde{W}`, shape ``(n_cells, k)`` for a ``k``-column :math:`\tilde{W}`.
    h
        :math:`\tilde{h}`, the last hidden layer followed by a column of ones (and zeros for
        any padding), shape ``(n_cells, k)``.
    gram
        :math:`\tilde{W}^\top \tilde{W}`, shape ``(k, k)``.

    Returns
    -------
    Shape ``(n_cells,)``.
    """
    return x_sq_norm - 2.0 * (x_dot_weight * h).sum(-1) + ((h @ gram) * h).sum(-1)


def gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    r"""KL of a diagonal Gaussian posterior from the standard normal prior, summed over dimensions.

    .. math::

        \mathrm{KL}\big(\mathcal{N}(\mu, \sigma^2) \,\|\, \mathcal{N}(0, 1)\big)
        = \tfrac{1}{2} \sum_j \big(\mu_j^2 + \sigma_j^2 - 1 - \log \sigma_j^2\big)

    Parameters
    ----------
    mu, log_sigma
        Posterior mean and log standard deviation, shape ``(n_cells, n_latent)``.

    Returns
    -------
    Shape ``(n_cells,)``.
    """
    return _gaussian_kl_per_dim(mu, log_sigma).sum(-1)


def _gaussian_kl_per_dim(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mu.pow(2) + torch.exp(2.0 * log_sigma) - 1.0 - 2.0 * log_sigma)


def bernoulli_kl(gamma: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""KL of the posterior spike probabilities from the prior's, summed over dimensions.

    .. math::

        \mathrm{KL}\big(\mathrm{Bern}(\gamma) \,\|\, \mathrm{Bern}(\alpha)\big)
        = \sum_j \gamma_j \log\frac{\gamma_j}{\alpha}
          + (1 - \gamma_j) \log\frac{1 - \gamma_j}{1 - \alpha}

    Parameters
    ----------
    gamma
        Posterior probability that each latent dimension is active (the *slab*),
        shape ``(n_cells, n_latent)``.
    alpha
        Prior probability of an active dimension, in ``(0, 1)``.

    Returns
    -------
    Shape ``(n_cells,)``.
    """
    gamma = gamma.clamp(_EPS, 1.0 - _EPS)
    return (
        gamma * torch.log(gamma / alpha) + (1.0 - gamma) * torch.log((1.0 - gamma) / (1.0 - alpha))
    ).sum(-1)


def spike_slab_kl(
    mu: torch.Tensor, log_sigma: torch.Tensor, spike_logits: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""KL of a spike-and-slab posterior from the spike-and-slab prior (Tonolini et al., 2019).

    Posterior and prior of each dimension are mixtures of a point mass at zero (the *spike*) and
    a Gaussian (the *slab*): :math:`q(z_j) = (1-\gamma_j)\,\delta(z_j) + \gamma_j\,
    \mathcal{N}(\mu_j, \sigma_j^2)` and :math:`p(z_j) = (1-\alpha)\,\delta(z_j) + \alpha\,
    \mathcal{N}(0, 1)`. The KL splits into a slab term and a spike term,

    .. math::

        \mathrm{KL} = \underbrace{\sum_j \gamma_j \,\tfrac{1}{2}
        \big(\mu_j^2 + \sigma_j^2 - 1 - \log \sigma_j^2\big)}_{\text{slab}}
        + \underbrace{\sum_j \gamma_j \log\frac{\gamma_j}{\alpha}
        + (1-\gamma_j) \log\frac{1-\gamma_j}{1-\alpha}}_{\text{spike}}.

    Parameters
    ----------
    mu, log_sigma
        Slab mean and log standard deviation, shape ``(n_cells, n_latent)``.
    spike_logits
        Logits of :math:`\gamma`, shape ``(n_cells, n_latent)``.
    alpha
        Prior probability of an active dimension (``prior_spike``).

    Returns
    -------
    The slab and spike terms, each of shape ``(n_cells,)``.
    """
    gamma = torch.sigmoid(spike_logits)
    slab = (gamma * _gaussian_kl_per_dim(mu, log_sigma)).sum(-1)
    spike = bernoulli_kl(gamma, alpha)
    return slab, spike


def spike_selection(
    spike_logits: torch.Tensor, sharpness: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Relaxed Bernoulli selection of active dimensions, :math:`\sigma(c\,(\eta + \gamma - 1))`.

    :math:`\eta \sim U(0, 1)` and the sharpness :math:`c` grows during training, so the selection
    tends to a hard 0/1 mask with :math:`P(\text{active}) = \gamma` (Tonolini et al., 2019).
    """
    gamma = torch.sigmoid(spike_logits)
    eta = torch.rand(gamma.shape, generator=generator, device=gamma.device, dtype=gamma.dtype)
    return torch.sigmoid(sharpness * (eta + gamma - 1.0))
