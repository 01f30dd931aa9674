"""One torch module for all three models; it knows nothing of AnnData."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ._latent import DeterministicLatent, GaussianLatent, LatentOutput, SpikeSlabLatent
from ._likelihood import LIKELIHOODS, Likelihood, LikelihoodName
from ._nn import Batch, ConditionalMLP, InputLinear, mlp

__all__ = ["LATENT_TYPES", "AutoencoderModule", "DecoderKind", "LatentType"]

LatentType = Literal["deterministic", "gaussian", "spike_slab"]
DecoderKind = Literal["mlp", "linear"]
LATENT_TYPES: dict[str, type[nn.Module]] = {
    "deterministic": DeterministicLatent,
    "gaussian": GaussianLatent,
    "spike_slab": SpikeSlabLatent,
}


class AutoencoderModule(nn.Module):
    """Encoder, latent layer and decoder of the write-up's architecture (section 2.4).

    With ``hidden=(128, 32, 16)`` the encoder is ``n_genes -> 128`` (linear, no activation, as
    written), ``-> 32`` (ReLU), then one ``32 -> 16 -> n_latent`` head per latent parameter; the
    decoder is ``n_latent -> 16 -> 32 -> 128`` (ReLU) ``-> n_genes``, whose last layer and loss
    are the ``likelihood``'s (``sv.models.LIKELIHOODS``). With ``n_batches``,
    the one-hot batch is concatenated to the input of every decoder layer (as scVI).

    Parameters
    ----------
    n_genes
        Input width.
    latent
        ``"deterministic"`` (deep AE), ``"gaussian"`` (β-VAE) or ``"spike_slab"`` (β-VSC).
    n_latent
        Latent dimensions.
    hidden
        Encoder widths, mirrored by the decoder.
    beta
        Weight of the KL term (ignored by the deterministic latent).
    prior_spike
        Prior probability of an active latent dimension (spike-and-slab only).
    first_activation
        Put a ReLU after the first layer. The write-up has none; kept off by default.
    kl_warmup
        Fraction of training, in ``[0, 1]``, over which the weight of the KL term rises
        linearly from 0 to ``beta`` (:meth:`set_progress`); 0 applies ``beta`` throughout.
    likelihood
        ``"gaussian"`` (squared error, for log-normalised data), ``"nb"``, ``"zinb"`` or
        ``"poisson"`` (raw counts).
    n_batches
        Number of batch categories whose one-hot conditions the decoder; 0 for none.
    encode_covariates
        Feed the one-hot batch to the encoder's first hidden layer too (scVI's
        ``encode_covariates``). Off by default.
    decoder
        ``"mlp"``: the encoder's widths mirrored (the write-up's decoder). ``"linear"``: the
        output layer reads the code (and the one-hot batch) directly, as scvi-tools' LDVAE.
    """

    def __init__(
        self,
        n_genes: int,
        latent: LatentType,
        *,
        n_latent: int = 6,
        hidden: Sequence[int] = (128, 32, 16),
        beta: float = 2.0,
        prior_spike: float = 0.5,
        first_activation: bool = False,
        kl_warmup: float = 0.0,
        likelihood: LikelihoodName = "gaussian",
        n_batches: int = 0,
        encode_covariates: bool = False,
        decoder: DecoderKind = "mlp",
    ):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        body = hidden[:-1] if len(hidden) > 1 else hidden
        head_widths = hidden[-1:] if len(hidden) > 1 else ()
        self.beta = float(beta)
        self.kl_warmup = float(kl_warmup)
        self.kl_weight = self.beta
        self.input_layer = InputLinear(n_genes, hidden[0])
        self.first_activation = nn.ReLU() if first_activation else nn.Identity()
        self.encoder_body = mlp(body, last_activation=True)
        kwargs = {"prior_spike": prior_spike} if latent == "spike_slab" else {}
        self.latent = LATENT_TYPES[latent](body[-1], head_widths, n_latent, **kwargs)
        if decoder not in ("mlp", "linear"):
            raise ValueError(f"`decoder` must be 'mlp' or 'linear', got {decoder!r}.")
        # "linear": no hidden layer, the output layer reads the code itself (and the batch).
        widths = [n_latent, *reversed(hidden)] if decoder == "mlp" else [n_latent]
        self.decoder_body = ConditionalMLP(widths, n_batches)
        self.likelihood: Likelihood = LIKELIHOODS[likelihood](widths[-1], n_genes, n_batches)
        self.input_covariates = (
            nn.Linear(n_batches, hidden[0], bias=False) if encode_covariates and n_batches else None
        )

    @property
    def output_layer(self) -> torch.nn.Module:
        """The decoder's last layer (the likelihood's; the mean's for count likelihoods)."""
        return self.likelihood.output_layer

    def inference(self, batch: Batch, generator: torch.Generator | None = None) -> LatentOutput:
        """Encode a batch: the posterior (or code) of each cell."""
        h = self.input_layer(self.likelihood.encoder_input(batch))
        if self.input_covariates is not None:
            h = h + self.input_covariates(batch.covariates)
        h = self.encoder_body(self.first_activation(h))
        return self.latent(h, generator)

    def generative(self, z: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Decode codes of shape ``(n_cells, n_latent)`` to the last hidden layer.

        ``covariates``: the one-hot batch, ``(n_cells, n_batches)``, when the model has any.
        """
        return self.decoder_body(z, covariates)

    def reconstruct(
        self,
        z: torch.Tensor,
        covariates: torch.Tensor | None = None,
        library: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Dense reconstruction (the likelihood's mean), shape ``(n_cells, n_genes)``.

        ``library``: each cell's library size, ``(n_cells,)``, for count likelihoods.
        """
        return self.likelihood.mean(self.generative(z, covariates), covariates, library)

    def decoder_logits(
        self, z: torch.Tensor, covariates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The output layer's value for codes ``z``, shape ``(n_cells, n_genes)``.

        The reconstruction (Gaussian) or the logits of the proportions (count likelihoods),
        before the softmax: see :meth:`~scvae_tools.models.Likelihood.logits`.
        """
        return self.likelihood.logits(self.generative(z, covariates), covariates)

    def draw(self, latent: LatentOutput, generator: torch.Generator | None = None) -> torch.Tensor:
        """One posterior sample of the codes, ``(n_cells, n_latent)``, from :meth:`encode`'s output.

        The code itself for the deterministic latent (see each latent layer's ``draw``).
        """
        return self.latent.draw(latent, generator)

    def reconstruction_loss(
        self, batch: Batch, h: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Reconstruction term of each cell, shape ``(n_cells,)``: the likelihood's loss.

        The summed squared error via the Gram identity (Gaussian), or the negative
        log-likelihood of the counts summed over genes. ``dtype`` (``torch.bfloat16``)
        computes the output layer's products and their gradients in that type (for the
        Gaussian: its Gram matrix, and its product with sparse training batches); None keeps
        the weights' float32.
        """
        return self.likelihood(batch, h, dtype)

    def loss(
        self,
        batch: Batch,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Named terms of the objective, each averaged over the cells of the batch.

        ``"reconstruction"`` is the likelihood's loss (squared error, or the negative
        log-likelihood of the counts); ``"loss"`` is ``reconstruction + kl_weight * kl``, where
        ``kl_weight`` is ``beta`` once any KL warm-up is over; ``"kl"`` is the sum of the latent
        layer's KL terms, which are reported too (``"kl_slab"``, ``"kl_spike"`` for the VSC).
        ``dtype``: see :meth:`reconstruction_loss`.
        """
        latent = self.inference(batch, generator)
        h = self.generative(latent.z, batch.covariates)
        recon = self.reconstruction_loss(batch, h, dtype)
        terms = {"reconstruction": recon.mean()}
        total = recon
        if latent.kl:
            kl = torch.stack(list(latent.kl.values())).sum(0)
            total = recon + self.kl_weight * kl
            terms["kl"] = kl.mean()
            if len(latent.kl) > 1:
                terms.update({name: value.mean() for name, value in latent.kl.items()})
        return {"loss": total.mean(), **terms}

    @torch.no_grad()
    def encode(self, batch: Batch) -> LatentOutput:
        """The representation of a batch, in evaluation mode."""
        was_training = self.training
        self.eval()
        try:
            return self.inference(batch)
        finally:
            self.train(was_training)

    def set_progress(self, fraction: float) -> None:
        """Set the KL weight for this point of training (``fraction`` from 0 to 1).

        Also forwarded to the latent layer (the VSC warms its selection sharpness up).
        """
        if self.kl_warmup > 0:
            self.kl_weight = self.beta * min(1.0, fraction / self.kl_warmup)
        self.latent.set_progress(fraction)
