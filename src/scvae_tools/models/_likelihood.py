r"""The likelihoods of the reconstruction: the decoder's output layer and its loss, one class each.

Each takes the decoder's last hidden layer ``h`` (``n_cells x n_hidden``) and a minibatch, and
returns the negative log-likelihood of every cell, summed over genes (shape ``(n_cells,)``);
:class:`GaussianLikelihood` returns the squared error, which is the Gaussian's up to constants.
Each also chooses what the encoder sees (:meth:`Likelihood.encoder_input`). A fifth likelihood
is one more class here and one more row of ``LIKELIHOODS``.

The count likelihoods (:class:`NegativeBinomialLikelihood`, :class:`ZINBLikelihood`,
:class:`PoissonLikelihood`) follow scVI and DCA: the decoder gives per-gene proportions
:math:`\rho = \mathrm{softmax}(W [h, c] + b)`, scaled by each cell's observed library size
:math:`l = \sum_g x_g` to the mean :math:`\mu = l \rho`. On a sparse minibatch they are
evaluated without densifying the counts: the log-likelihood of a zero count is computed for
every entry (a dense ``n_cells x n_genes`` term that the mean needs anyway), and the terms that
depend on :math:`x` are added at the stored non-zeros only,

.. math::

    \sum_g \log p(x_g) = \sum_g \log p(0 \mid \mu_g)
    + \sum_{g:\, x_g > 0} \big(\log p(x_g \mid \mu_g) - \log p(0 \mid \mu_g)\big).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._losses import squared_error_gram
from ._nn import Batch, OutputLinear, _low, output_products

__all__ = [
    "LIKELIHOODS",
    "GaussianLikelihood",
    "Likelihood",
    "LikelihoodName",
    "NegativeBinomialLikelihood",
    "PoissonLikelihood",
    "ZINBLikelihood",
]

LikelihoodName = Literal["gaussian", "nb", "zinb", "poisson"]


class Likelihood(nn.Module):
    """The interface of a likelihood: an output layer, its loss, and the encoder's input.

    Parameters
    ----------
    n_hidden
        Width of the decoder's last hidden layer.
    n_genes
        Number of genes.
    n_covariates
        Width of the one-hot batch fed to the output layer beside ``h`` (0: none).
    """

    #: Whether the likelihood is for raw counts (non-negative integers).
    counts: ClassVar[bool] = False

    def __init__(self, n_hidden: int, n_genes: int, n_covariates: int = 0):
        super().__init__()
        self.n_covariates = n_covariates

    def encoder_input(self, batch: Batch) -> Batch:
        """The batch as the encoder sees it."""
        return batch

    def scale_output_weights(self, gene_scale: torch.Tensor) -> None:
        """Multiply each gene's row of the output layer's weights ``W`` by ``gene_scale``.

        Used once, on the initial weights; the bias is left as it is.

        Parameters
        ----------
        gene_scale
            Shape ``(n_genes,)``.
        """
        with torch.no_grad():
            self.output_layer.weight.mul_(gene_scale.to(self.output_layer.weight)[:, None])

    def forward(
        self, batch: Batch, h: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Negative log-likelihood of each cell of ``batch``, summed over genes.

        Parameters
        ----------
        batch
            The observed minibatch ``x``, ``(n_cells, n_genes)``, with its covariates if any.
        h
            The decoder's last hidden layer, ``(n_cells, n_hidden)``.
        dtype
            Type of the output layer's products (``torch.bfloat16`` for
            ``precision="bfloat16"``); None: float32.

        Returns
        -------
        Shape ``(n_cells,)``.
        """
        raise NotImplementedError

    def mean(
        self, h: torch.Tensor, covariates: torch.Tensor | None, library: torch.Tensor | None
    ) -> torch.Tensor:
        """The expected value of ``x`` given ``h``, dense, shape ``(n_cells, n_genes)``.

        ``library`` (``(n_cells,)``) is the library size of each cell (count likelihoods).
        """
        raise NotImplementedError

    def logits(self, h: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
        """The output layer's value, ``W [h, c] + b``, shape ``(n_cells, n_genes)``.

        The decoder's output on its log scale: the reconstruction itself for the Gaussian (on
        log-normalised data), the log-proportions up to a constant per cell for the count
        likelihoods (their softmax is the proportions).
        """
        return self.output_layer(h, covariates)


class GaussianLikelihood(Likelihood):
    r"""Squared error, :math:`\lVert x - W [h, c] - b \rVert^2`, on log-normalised data.

    Computed by the Gram identity (:func:`~scvae_tools.models.squared_error_gram`): one
    multiply per non-zero of a sparse minibatch, and no dense ``n_cells x n_genes`` output.
    This is the write-up's loss; a Gaussian with unit variance up to constants. The batch's
    one-hot enters as more columns of the output layer's input, so the identity still holds.
    """

    def __init__(self, n_hidden: int, n_genes: int, n_covariates: int = 0):
        super().__init__(n_hidden, n_genes, n_covariates)
        self.output_layer = OutputLinear(n_hidden, n_genes, n_covariates)

    def forward(
        self, batch: Batch, h: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Summed squared error of each cell, shape ``(n_cells,)`` (see :class:`Likelihood`)."""
        layer = self.output_layer
        x_dot_weight, gram = output_products(batch, layer.packed, dtype)
        return squared_error_gram(
            batch.sq_norm, x_dot_weight, layer.augment(h, batch.covariates), gram
        )

    def mean(
        self, h: torch.Tensor, covariates: torch.Tensor | None, library: torch.Tensor | None
    ) -> torch.Tensor:
        """``W [h, c] + b``, shape ``(n_cells, n_genes)``."""
        return self.output_layer(h, covariates)


def _gather(value: torch.Tensor, flat: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
    """``value`` at the non-zeros: by flat position if per entry, by gene if per gene."""
    return value.reshape(-1)[flat] if value.dim() == 2 else value[genes]


class _CountLikelihood(Likelihood):
    """Shared part of the count likelihoods: proportions times the observed library size."""

    counts = True

    def __init__(self, n_hidden: int, n_genes: int, n_covariates: int = 0):
        super().__init__(n_hidden, n_genes, n_covariates)
        self.output_layer = nn.Linear(n_hidden + n_covariates, n_genes)

    def encoder_input(self, batch: Batch) -> Batch:
        """``log(1 + x)`` of the counts, as scVI; it keeps the sparsity pattern.

        On a synthetic two-batch count set with varying depth (three seeds), ``log1p`` mixed
        the batches as well as ``log1p`` of counts per 10,000 (kNN fraction from the other
        batch 0.31-0.40 vs 0.36-0.38, labels equally pure) and more stably than raw counts
        (0.25-0.47), without a per-cell rescaling of both value arrays.
        """
        return batch.map_values(torch.log1p)

    def _input(self, h: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([h, covariates], dim=1) if self.n_covariates else h

    def logits(self, h: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
        """``W [h, c] + b``: the proportions are their softmax (see :class:`Likelihood`)."""
        return self.output_layer(self._input(h, covariates))

    @staticmethod
    def _linear(h: torch.Tensor, layer: nn.Linear, dtype: torch.dtype | None) -> torch.Tensor:
        if dtype is None:
            return layer(h)
        return F.linear(_low(h, dtype), _low(layer.weight, dtype), _low(layer.bias, dtype)).to(
            h.dtype
        )

    def parameters_of(
        self,
        h: torch.Tensor,
        covariates: torch.Tensor | None,
        log_library: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """The distribution's parameters: ``log_mu`` ``(n_cells, n_genes)`` and the others.

        Per-entry parameters have shape ``(n_cells, n_genes)``, gene-wise ones ``(n_genes,)``.
        """
        logits = self._linear(self._input(h, covariates), self.output_layer, dtype)
        return {"log_mu": torch.log_softmax(logits, dim=-1) + log_library[:, None]}

    def log_prob(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Elementwise :math:`\log p(x)`; ``x`` and ``params`` broadcast together."""
        raise NotImplementedError

    def log_prob_zero(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Elementwise :math:`\log p(0)`, cheaper than ``log_prob`` at zeros."""
        raise NotImplementedError

    def log_likelihood(self, batch: Batch, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r""":math:`\sum_g \log p(x_g)` per cell, shape ``(n_cells,)``; sparse stays sparse."""
        if not batch.is_sparse:
            return self.log_prob(batch.dense, params).sum(-1)
        rows = batch.rows()
        genes = batch.indices.long()
        flat = rows * params["log_mu"].shape[1] + genes
        at_values = {name: _gather(value, flat, genes) for name, value in params.items()}
        correction = self.log_prob(batch.values, at_values) - self.log_prob_zero(at_values)
        return self.log_prob_zero_sum(params).index_add(0, rows, correction)

    def log_prob_zero_sum(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r""":math:`\sum_g \log p(0 \mid \cdot_g)` per cell, over all genes; shape ``(n_cells,)``.

        The one dense term of the sparse path: subclasses write it in as few passes over the
        ``n_cells x n_genes`` entries as they can.
        """
        return self.log_prob_zero(params).sum(-1)

    def forward(
        self, batch: Batch, h: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Negative log-likelihood of each cell's counts, shape ``(n_cells,)``.

        The library size is each cell's observed total count (at least 1).
        """
        log_library = batch.row_sums().clamp(min=1.0).log()
        params = self.parameters_of(h, batch.covariates, log_library, dtype)
        return -self.log_likelihood(batch, params)

    def mean(
        self, h: torch.Tensor, covariates: torch.Tensor | None, library: torch.Tensor | None
    ) -> torch.Tensor:
        r""":math:`\mu = l \rho`, shape ``(n_cells, n_genes)``."""
        return torch.exp(self.parameters_of(h, covariates, library.log())["log_mu"])


class PoissonLikelihood(_CountLikelihood):
    r"""Poisson counts with mean :math:`\mu = l \rho`.

    .. math::

        \log p(x \mid \mu) = x \log \mu - \mu - \log \Gamma(x + 1)

    The zero term :math:`-\mu` sums to :math:`-l` over genes, so no dense term but the
    softmax's is needed.
    """

    def log_prob(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Elementwise :math:`\log p(x)`."""
        log_mu = params["log_mu"]
        return x * log_mu - torch.exp(log_mu) - torch.lgamma(x + 1.0)

    def log_prob_zero(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Elementwise :math:`\log p(0) = -\mu`."""
        return -torch.exp(params["log_mu"])

    def log_prob_zero_sum(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r""":math:`-\sum_g \mu_g`, which is :math:`-l` for the model's own means."""
        return -torch.logsumexp(params["log_mu"], dim=-1).exp()


class NegativeBinomialLikelihood(_CountLikelihood):
    r"""Negative binomial counts with mean :math:`\mu = l \rho` and gene-wise dispersion.

    The inverse dispersion :math:`\theta_g = \exp(\text{log\_theta}_g)` is learned per gene
    (as scVI's ``dispersion="gene"``); the variance is :math:`\mu + \mu^2 / \theta`.

    .. math::

        \log \mathrm{NB}(x \mid \mu, \theta) =
        \theta \log\frac{\theta}{\theta + \mu} + x \log\frac{\mu}{\theta + \mu}
        + \log\Gamma(x + \theta) - \log\Gamma(\theta) - \log\Gamma(x + 1)

    At :math:`x = 0` only the first term remains; it is computed for every entry, the rest at
    the non-zeros only.
    """

    def __init__(self, n_hidden: int, n_genes: int, n_covariates: int = 0):
        super().__init__(n_hidden, n_genes, n_covariates)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def parameters_of(
        self,
        h: torch.Tensor,
        covariates: torch.Tensor | None,
        log_library: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """``log_mu`` ``(n_cells, n_genes)`` and ``log_theta`` ``(n_genes,)``."""
        params = super().parameters_of(h, covariates, log_library, dtype)
        return {**params, "log_theta": self.log_theta}

    def _dropout_logits(self, h: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor | None:
        return None

    def forward(
        self, batch: Batch, h: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Negative log-likelihood of each cell's counts, shape ``(n_cells,)``.

        Sparse minibatches take a fused path whose backward pass is written out: about half
        the passes over the dense ``n_cells x n_genes`` entries that autograd makes of the
        same formulas.
        """
        if not batch.is_sparse:
            return super().forward(batch, h, dtype)
        rows = batch.rows()
        log_library = (
            batch.values.new_zeros(batch.n_cells).index_add_(0, rows, batch.values).clamp(min=1.0)
        ).log()
        hc = self._input(h, batch.covariates)
        logits = self._linear(hc, self.output_layer, dtype)
        genes = batch.indices.long()
        flat = rows * logits.shape[1] + genes
        return -_SparseNBLogLikelihood.apply(
            logits,
            self.log_theta,
            self._dropout_logits(hc, dtype),
            log_library,
            rows,
            genes,
            flat,
            batch.values,
        )

    def log_prob(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Elementwise :math:`\log \mathrm{NB}(x)`."""
        log_mu, log_theta = params["log_mu"], params["log_theta"]
        theta = torch.exp(log_theta)
        # log(mu / (theta + mu)) = u - softplus(u) and log(theta / (theta + mu)) = -softplus(u)
        u = log_mu - log_theta
        softplus_u = F.softplus(u)
        return (
            x * (u - softplus_u)
            - theta * softplus_u
            + torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1.0)
        )

    def log_prob_zero(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Elementwise :math:`\log \mathrm{NB}(0) = -\theta \log(1 + \mu / \theta)`."""
        log_theta = params["log_theta"]
        return -torch.exp(log_theta) * F.softplus(params["log_mu"] - log_theta)

    def log_prob_zero_sum(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r""":math:`-\sum_g \theta_g \log(1 + \mu_g / \theta_g)`: one product with :math:`\theta`."""
        log_theta = params["log_theta"]
        return -(F.softplus(params["log_mu"] - log_theta) @ torch.exp(log_theta))


class ZINBLikelihood(NegativeBinomialLikelihood):
    r"""Zero-inflated negative binomial: NB as :class:`NegativeBinomialLikelihood`, plus zeros.

    A second decoder head gives the zero-inflation logits :math:`\pi = W_\pi [h, c] + b_\pi`
    (the probability of an extra zero is :math:`\sigma(\pi)`), as in scVI and DCA:

    .. math::

        \log p(0) &= \log\big(\sigma(\pi) + \sigma(-\pi)\,\mathrm{NB}(0 \mid \mu, \theta)\big)
        = \mathrm{softplus}\big(-\pi + \theta \log\tfrac{\theta}{\theta + \mu}\big)
          - \mathrm{softplus}(-\pi), \\
        \log p(x) &= -\mathrm{softplus}(\pi) + \log \mathrm{NB}(x \mid \mu, \theta)
        \quad (x > 0).
    """

    def __init__(self, n_hidden: int, n_genes: int, n_covariates: int = 0):
        super().__init__(n_hidden, n_genes, n_covariates)
        self.dropout_layer = nn.Linear(n_hidden + n_covariates, n_genes)

    def parameters_of(
        self,
        h: torch.Tensor,
        covariates: torch.Tensor | None,
        log_library: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """``log_mu`` and ``dropout_logits`` ``(n_cells, n_genes)``, ``log_theta``."""
        params = super().parameters_of(h, covariates, log_library, dtype)
        dropout = self._dropout_logits(self._input(h, covariates), dtype)
        return {**params, "dropout_logits": dropout}

    def _dropout_logits(self, h: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return self._linear(h, self.dropout_layer, dtype)

    def log_prob(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Elementwise :math:`\log p(x)`, for zeros and non-zeros alike."""
        nb = super().log_prob(x, params)
        return torch.where(
            x > 0, nb - F.softplus(params["dropout_logits"]), self.log_prob_zero(params)
        )

    def log_prob_zero(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r"""Elementwise :math:`\log p(0)`."""
        pi = params["dropout_logits"]
        return F.softplus(super().log_prob_zero(params) - pi) - F.softplus(-pi)

    def log_prob_zero_sum(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        r""":math:`\sum_g \log p(0)` per cell (not the NB's shortcut)."""
        return self.log_prob_zero(params).sum(-1)


class _SparseNBLogLikelihood(torch.autograd.Function):
    r"""NB (ZINB with ``dropout``) log-likelihood of a sparse minibatch per cell, fused.

    Inputs: ``logits`` :math:`s` ``(n_cells, n_genes)`` (:math:`\rho = \mathrm{softmax}(s)`),
    ``log_theta`` ``(n_genes,)``, ``dropout`` logits :math:`\pi` ``(n_cells, n_genes)`` or None,
    ``log_library`` ``(n_cells,)``, and the non-zeros: their ``rows``, ``genes``, flat
    positions ``flat`` and counts ``x``. With :math:`u = \log(\mu / \theta)`, the zero term
    is :math:`-\theta\,\mathrm{softplus}(u)` and the non-zeros add
    :math:`x\,(u - \mathrm{softplus}(u)) + \log\Gamma(x + \theta) - \log\Gamma(\theta)
    - \log\Gamma(x + 1)` (and the zero-inflation terms). The backward pass uses
    :math:`\partial \log p / \partial \log \mu = a`, summed into the softmax's gradient
    :math:`g\,(a - \rho \sum_g a_g)`, with :math:`q = \sigma(u) = \mu / (\theta + \mu)`:
    :math:`a = -\theta q` at zeros, plus :math:`x\,(1 - q)` at the non-zeros (NB).
    """

    @staticmethod
    def forward(ctx, logits, log_theta, dropout, log_library, rows, genes, flat, x):
        # exp once: e = exp(s - max), softmax = e / sum(e), r = mu / theta = e * l / (sum * theta)
        top = logits.amax(1)
        e = logits.sub(top[:, None]).exp_()
        total = e.sum(1)
        log_total = total.log()
        theta = log_theta.exp()
        r = e.mul((log_library - log_total).exp()[:, None]).mul_(theta.reciprocal())
        sp_u = torch.log1p(r)  # softplus(u), u = log(mu / theta)
        th = theta.index_select(0, genes)
        # u at the non-zeros from the logits, not from r, which may underflow
        u_nz = (
            logits.reshape(-1).index_select(0, flat)
            + (log_library - top - log_total).index_select(0, rows)
            - log_theta.index_select(0, genes)
        )
        sp_nz = sp_u.reshape(-1).index_select(0, flat)
        # log NB(x) - log NB(0) at the non-zeros
        correction = (
            x * (u_nz - sp_nz)
            + torch.lgamma(x + th)
            - torch.lgamma(theta).index_select(0, genes)
            - torch.lgamma(x + 1.0)
        )
        w = w_nz = None
        if dropout is None:
            ll = -(sp_u @ theta)
        else:
            t = sp_u.mul(-theta).sub_(dropout)  # log NB(0) - pi
            ll = (F.softplus(t) - F.softplus(-dropout)).sum(1)
            w = torch.sigmoid(t)
            pi_nz = dropout.reshape(-1).index_select(0, flat)
            f0_nz = -th * sp_nz
            t_nz = f0_nz - pi_nz
            w_nz = torch.sigmoid(t_nz)
            zero_nz = F.softplus(t_nz) - F.softplus(-pi_nz)
            correction = correction + f0_nz - F.softplus(pi_nz) - zero_nz
        ctx.save_for_backward(e, total, sp_u, theta, dropout, w, rows, genes, th, sp_nz, w_nz)
        ctx.flat, ctx.x = flat, x
        return ll.index_add(0, rows, correction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        e, total, sp_u, theta, dropout, w, rows, genes, th, sp_nz, w_nz = ctx.saved_tensors
        flat, x = ctx.flat, ctx.x
        g_nz = grad.index_select(0, rows)
        inv = sp_u.neg().exp_()  # 1 / (1 + r) = 1 - q, q = sigmoid(u) = mu / (theta + mu)
        q_nz = 1.0 - torch.exp(-sp_nz)
        digammas = torch.digamma(x + th) - torch.digamma(theta).index_select(0, genes)
        a_nz = x * (1.0 - q_nz)  # d/d log mu of the correction (NB)
        b_nz = th * digammas - a_nz  # d/d log theta of the correction (NB)
        grad_dropout = None
        if dropout is None:
            # dense: d/d log mu = -theta q, d/d log theta = theta (q - softplus(u))
            grad_log_theta = theta * (grad.sum() - grad @ inv - grad @ sp_u)
            a = inv.sub_(1.0).mul_(theta)
        else:
            # dense: each NB term times w = sigmoid(log NB(0) - pi); d/d pi = sigmoid(-pi) - w
            q = inv.neg_().add_(1.0)
            grad_log_theta = theta * (grad @ (q - sp_u).mul_(w))
            a = q.mul_(w).mul_(-theta)
            a_nz = a_nz - th * q_nz * (1.0 - w_nz)
            b_nz = b_nz + th * (q_nz - sp_nz) * (1.0 - w_nz)
            grad_dropout = torch.sigmoid(-dropout).sub_(w).mul_(grad[:, None])
            grad_dropout.reshape(-1).index_add_(0, flat, g_nz * (w_nz - 1.0))
        total_a = a.sum(1).index_add_(0, rows, a_nz)
        grad_log_theta.index_add_(0, genes, g_nz * b_nz)
        # a - softmax * sum(a), softmax = e / total
        grad_logits = a.addcmul_(e, (-total_a / total)[:, None]).mul_(grad[:, None])
        grad_logits.reshape(-1).index_add_(0, flat, g_nz * a_nz)
        return grad_logits, grad_log_theta, grad_dropout, None, None, None, None, None


#: The likelihood class for each ``likelihood`` name.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    "gaussian": GaussianLikelihood,
    "nb": NegativeBinomialLikelihood,
    "zinb": ZINBLikelihood,
    "poisson": PoissonLikelihood,
}
