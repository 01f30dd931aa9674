"""One torch module for all three models; it knows nothing of AnnData."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._latent import DeterministicLatent, GaussianLatent, LatentOutput, SpikeSlabLatent
from ._likelihood import LIKELIHOODS, Likelihood, LikelihoodName
from ._nn import (
    ACTIVATIONS,
    Batch,
    ConditionalMLP,
    InputLinear,
    InsertedColumns,
    covariate_columns,
    mlp,
)

__all__ = ["LATENT_TYPES", "ActivationKind", "AutoencoderModule", "DecoderKind", "LatentType"]

LatentType = Literal["deterministic", "gaussian", "spike_slab"]
DecoderKind = Literal["linear", "shallow", "mlp"]
ActivationKind = Literal["relu", "leaky_relu"]

#: Hidden widths of each kind of decoder, from the encoder's ``hidden``: none ("linear", the
#: output layer reads the code and the batch), the first encoder width once ("shallow", as
#: scVI's one-hidden-layer decoder), or all of them mirrored ("mlp", the write-up's).
DECODER_WIDTHS = {
    "linear": lambda hidden: [],
    "shallow": lambda hidden: [hidden[0]],
    "mlp": lambda hidden: list(reversed(hidden)),
}
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
        Put the activation after the first layer. The write-up has none; kept off by default.
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
        ``"mlp"``: the encoder's widths mirrored (the write-up's decoder; the default here, so
        that models saved before the ``decoder`` option load as they were trained).
        ``"linear"``: the output layer reads the code (and the one-hot batch) directly, as
        scvi-tools' LDVAE. ``"shallow"``: one hidden layer as wide as the encoder's first, as
        scVI's decoder. The tools choose with their ``decoder="auto"``.
    activation
        The hidden layers' activation, a key of ``_nn.ACTIVATIONS`` (``"relu"``, the write-up's,
        or ``"leaky_relu"``).
    linear_path
        Add a linear map of the encoder's input to the code's location (the AE's code, the
        mean of the VAE and the VSC), as ``n_latent`` more columns of the first layer, and
        start the nonlinear encoder's location head at zero:
        the code then starts as the linear path's, which :meth:`init_linear_path` sets to the
        leading principal components. Off by default.
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
        activation: ActivationKind = "relu",
        linear_path: bool = False,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {tuple(ACTIVATIONS)}, got {activation!r}."
            )
        act = ACTIVATIONS[activation]
        hidden = tuple(int(h) for h in hidden)
        body = hidden[:-1] if len(hidden) > 1 else hidden
        head_widths = hidden[-1:] if len(hidden) > 1 else ()
        self.n_batches = int(n_batches)
        self.beta = float(beta)
        self.kl_warmup = float(kl_warmup)
        self.kl_weight = self.beta
        #: Whether the encoder has the linear path (its columns follow the first layer's).
        self.linear_path = bool(linear_path)
        self._n_hidden_in = hidden[0]
        self.input_layer = InputLinear(n_genes, hidden[0])
        self.first_activation = act() if first_activation else nn.Identity()
        self.encoder_body = mlp(body, last_activation=True, activation=act)
        kwargs = {"prior_spike": prior_spike} if latent == "spike_slab" else {}
        self.latent = LATENT_TYPES[latent](
            body[-1], head_widths, n_latent, activation=act, **kwargs
        )
        if decoder not in DECODER_WIDTHS:
            raise ValueError(f"`decoder` must be one of {tuple(DECODER_WIDTHS)}, got {decoder!r}.")
        widths = [n_latent, *DECODER_WIDTHS[decoder](hidden)]
        #: True when the decoder has no hidden layer, so the output layer reads the code directly.
        self.linear_decoder = len(widths) == 1
        self.decoder_body = ConditionalMLP(widths, n_batches, activation=act)
        self.likelihood: Likelihood = LIKELIHOODS[likelihood](widths[-1], n_genes, n_batches)
        self.input_covariates = (
            nn.Linear(n_batches, hidden[0], bias=False) if encode_covariates and n_batches else None
        )
        if linear_path:
            # The path is the first layer's last columns: one pass over a sparse batch's
            # non-zeros instead of two. Drawn last, so that every other weight starts as it
            # would without the path.
            path = InputLinear(n_genes, n_latent)
            first = self.input_layer
            first.weight = nn.Parameter(torch.cat([first.weight.detach(), path.weight.detach()], 1))
            first.bias = nn.Parameter(torch.cat([first.bias.detach(), path.bias.detach()]))
            self.latent.zero_location()
            # The path's output is its layer's times this factor, so that its weights are of
            # order 1: Adam moves every weight by about ``lr`` per step, and would rewrite
            # weights of PCA's size (about 1 / sqrt(n_genes)) within tens of steps.
            self.register_buffer("path_scale", torch.tensor(1.0))

    def init_linear_path(
        self, components: torch.Tensor, center: torch.Tensor, scale: float = 1.0
    ) -> None:
        """Set the linear path to ``scale * components @ (x - center)``.

        Parameters
        ----------
        components
            ``(n_latent, n_genes)``: the principal axes of the encoder's input, one per row.
        center
            ``(n_genes,)``: the input's mean.
        scale
            One factor for every axis, so that the path keeps PCA's relative geometry.
        """
        if not self.linear_path:
            raise ValueError("The module has no linear path (linear_path=False).")
        unit = float(components.shape[1]) ** 0.5
        layer = self.input_layer
        weight = components.T.to(layer.weight) * unit
        with torch.no_grad():
            layer.weight[:, self._n_hidden_in :] = weight
            layer.bias[self._n_hidden_in :] = -(center.to(weight) @ weight)
            self.path_scale.fill_(scale / unit)

    @property
    def output_layer(self) -> torch.nn.Module:
        """The decoder's last layer (the likelihood's; the mean's for count likelihoods)."""
        return self.likelihood.output_layer

    def batch_columns(self) -> dict[str, int]:
        """Where the one-hot batch enters the weights: every weight that reads it.

        Returns
        -------
        The name of each such parameter (as in ``state_dict()``) and the index of its first
        batch column along dim 1; the ``n_batches`` columns from there act on the one-hot. The
        encoder's covariate layer (``encode_covariates``), every decoder layer and the
        likelihood's output layer(s). Empty without batches.
        """
        columns = {}
        parts = {
            "input_covariates": self.input_covariates,
            "decoder_body": self.decoder_body,
            "likelihood": self.likelihood,
        }
        for prefix, part in parts.items():
            if part is not None:
                found = covariate_columns(part, self.n_batches)
                columns.update({f"{prefix}.{name}": at for name, at in found.items()})
        return columns

    @contextlib.contextmanager
    def train_batches_only(self, first: int) -> Iterator[list[nn.Parameter]]:
        """Within the block, only the weights of batch columns ``first`` on can train.

        Architecture surgery as scArches: each weight of :meth:`batch_columns` is split into
        its columns for batches ``first`` to ``n_batches - 1``, a new trainable parameter, and
        the rest, frozen (``InsertedColumns``); every other parameter
        is frozen too. On leaving, the parts are joined back into ordinary parameters (the
        frozen values bit for bit) and ``requires_grad`` is restored.

        Parameters
        ----------
        first
            Index of the first batch whose columns train, ``0 <= first < n_batches``.

        Yields
        ------
        The trainable parameters, to hand to the optimizer.
        """
        if not 0 <= first < self.n_batches:
            raise ValueError(f"`first` must lie in [0, {self.n_batches}), got {first}.")
        n = self.n_batches - first
        grads = {name: p.requires_grad for name, p in self.named_parameters()}
        for p in self.parameters():
            p.requires_grad_(False)
        split: list[tuple[nn.Module, str, list[str]]] = []
        try:
            for name, at in self.batch_columns().items():
                owner_name, attr = name.rsplit(".", 1)
                owner = self.get_submodule(owner_name)
                order = list(owner._parameters)
                weight = getattr(owner, attr)
                parametrize.register_parametrization(
                    owner, attr, InsertedColumns(weight, at + first, n)
                )
                owner.parametrizations[attr].original.requires_grad_(False)
                split.append((owner, attr, order))
            yield [p for p in self.parameters() if p.requires_grad]
        finally:
            for owner, attr, order in split:
                parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
                # Re-registered last: put the parameters back in their order (state_dict's).
                params = owner._parameters
                params.update([(k, params.pop(k)) for k in order])
            for name, p in self.named_parameters():
                p.requires_grad_(grads.get(name, True))

    def inference(self, batch: Batch, generator: torch.Generator | None = None) -> LatentOutput:
        """Encode a batch: the posterior (or code) of each cell."""
        h = self.input_layer(self.likelihood.encoder_input(batch))
        offset = None
        if self.linear_path:
            h, offset = h[:, : self._n_hidden_in], h[:, self._n_hidden_in :] * self.path_scale
        if self.input_covariates is not None:
            h = h + self.input_covariates(batch.covariates)
        h = self.encoder_body(self.first_activation(h))
        return self.latent(h, generator, offset)

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
