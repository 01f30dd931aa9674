"""The three latent layers: the only part in which the three models differ.

Each takes the encoder's last shared hidden layer ``h`` and returns a :class:`LatentOutput`: the
code passed to the decoder during training (``z``), the representation written to ``obsm``
(``mean``) and the KL terms of the objective. A fourth latent type is one more class here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._losses import gaussian_kl, spike_selection, spike_slab_kl
from ._nn import mlp

__all__ = ["DeterministicLatent", "GaussianLatent", "LatentOutput", "SpikeSlabLatent"]


@dataclass
class LatentOutput:
    """What a latent layer gives the rest of the model.

    Attributes
    ----------
    z
        Code fed to the decoder, shape ``(n_cells, n_latent)``: a sample while training, the mean
        otherwise.
    mean
        The representation of each cell, shape ``(n_cells, n_latent)``.
    kl
        Named KL terms, each of shape ``(n_cells,)``; their sum is weighted by ``beta``.
    extras
        Further per-cell outputs, such as ``"spike"`` probabilities.
    """

    z: torch.Tensor
    mean: torch.Tensor
    kl: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def _normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


Activation = Callable[[], nn.Module]


class _Latent(nn.Module):
    #: Multiplies the floor of optimizer steps of ``epochs="auto"`` (``_schedule.MIN_STEPS``).
    step_factor: int = 1
    #: The hidden layers' activation that the tools' ``activation="auto"`` gives this model
    #: (a key of ``_nn.ACTIVATIONS``).
    default_activation: str = "relu"
    #: The head that gives the code's location, the AE's code or the mean of the others, to
    #: which the encoder's linear path (``AutoencoderModule(linear_path=True)``) is added.
    location_head: str = "mu"
    #: Whether the tools' ``linear_path="auto"`` gives this model the encoder's linear path
    #: (with the Gaussian likelihood and without a ``batch_key`` only).
    default_linear_path: bool = False

    def __init__(
        self,
        n_in: int,
        widths: Sequence[int],
        n_latent: int,
        heads: Sequence[str],
        activation: Activation = nn.ReLU,
    ):
        super().__init__()
        self.heads = nn.ModuleDict(
            {
                name: mlp([n_in, *widths, n_latent], last_activation=False, activation=activation)
                for name in heads
            }
        )

    def set_progress(self, fraction: float) -> None:
        """Tell the layer how far training has come (0 at the start, 1 at the end)."""

    def zero_location(self) -> None:
        """Start the location head's output at zero (its last layer's weights and bias).

        With a linear path beside the encoder, the nonlinear encoder is then a residual that
        starts at zero, and the code starts as the linear path's.
        """
        last = self.heads[self.location_head][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()

    def forward(
        self,
        h: torch.Tensor,
        generator: torch.Generator | None = None,
        offset: torch.Tensor | None = None,
    ) -> LatentOutput:
        """Encode ``h`` of shape ``(n_cells, n_in)``.

        ``offset``, ``(n_cells, n_latent)``, is added to the location head's output (the
        encoder's linear path).
        """
        location = self.heads[self.location_head](h)
        return self._encode(location if offset is None else location + offset, h, generator)

    def _encode(
        self, location: torch.Tensor, h: torch.Tensor, generator: torch.Generator | None
    ) -> LatentOutput:
        raise NotImplementedError

    def draw(self, out: LatentOutput, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sample of the posterior described by ``out``, shape ``(n_cells, n_latent)``.

        ``out`` is the layer's own output for the cells (in either mode); the sample is drawn
        as the generative model defines it, whatever the training-time relaxation.
        """
        raise NotImplementedError


class DeterministicLatent(_Latent):
    """Deep autoencoder: ``z = f(h)``, no KL term.

    The code is linear (no ReLU on the bottleneck, unlike the write-up's equation for ``z``):
    a ReLU there lets whole latent dimensions die at zero.
    """

    # Nothing fixes the scale of a deterministic code, and with the linear decoder the AE was
    # still far from converged at the VAE's 2,200 steps on small plates (suite page).
    step_factor = 2
    # With nothing but the reconstruction to train it, the AE's ReLUs die: on all 15,571 genes
    # of SORT-seq, 62-100 % of its head's 16 units were never positive after training, and two
    # of three seeds collapsed to one or no live unit (suite page). A leaky ReLU keeps them.
    default_activation = "leaky_relu"
    location_head = "code"
    # Reconstruction fixes the code's subspace but not its geometry, and nothing else shapes
    # the AE's: started at PCA's, its worst gap to PCA 6 on the suite's single samples went
    # from -0.103 to -0.055 (suite page).
    default_linear_path = True

    def __init__(
        self, n_in: int, widths: Sequence[int], n_latent: int, activation: Activation = nn.ReLU
    ):
        super().__init__(n_in, widths, n_latent, ["code"], activation)

    def _encode(
        self, code: torch.Tensor, h: torch.Tensor, generator: torch.Generator | None
    ) -> LatentOutput:
        return LatentOutput(z=code, mean=code)

    def draw(self, out: LatentOutput, generator: torch.Generator | None = None) -> torch.Tensor:
        """The code itself: a deterministic encoder has no posterior to sample."""
        return out.mean


class GaussianLatent(_Latent):
    r"""β-VAE: :math:`z \sim \mathcal{N}(\mu, \sigma^2)` by the reparametrisation trick."""

    # Started at PCA's geometry, the VAE's worst gap to PCA 6 on the suite's single samples
    # went from -0.116 to -0.058, and its seed spread on all genes narrowed (suite page). Not
    # the VSC's: its code collapsed on 2 of 3 seeds of two sets with the path, still did with a
    # KL warm-up, and started at a fifth of the scale it lowered the worst gap (-0.078).
    default_linear_path = True

    def __init__(
        self, n_in: int, widths: Sequence[int], n_latent: int, activation: Activation = nn.ReLU
    ):
        super().__init__(n_in, widths, n_latent, ["mu", "log_sigma"], activation)

    def _encode(
        self, mu: torch.Tensor, h: torch.Tensor, generator: torch.Generator | None
    ) -> LatentOutput:
        log_sigma = self.heads["log_sigma"](h)
        if self.training:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(log_sigma) * eps
        else:
            z = mu
        return LatentOutput(
            z=z, mean=mu, kl={"kl": gaussian_kl(mu, log_sigma)}, extras={"log_sigma": log_sigma}
        )

    def draw(self, out: LatentOutput, generator: torch.Generator | None = None) -> torch.Tensor:
        r""":math:`\mu + \sigma \epsilon`, :math:`\epsilon \sim \mathcal{N}(0, I)`."""
        return out.mean + torch.exp(out.extras["log_sigma"]) * _normal(out.mean, generator)


class SpikeSlabLatent(_Latent):
    r"""β-VSC: spike-and-slab code :math:`z = s \odot (\mu + \sigma \epsilon)` (Tonolini et al.).

    The spike probability is :math:`\gamma = \mathrm{sigmoid}(\text{spike\_logits})`, which has a
    gradient everywhere (the paper's :math:`\log\gamma = -\mathrm{ReLU}(-v)` freezes any dimension
    whose :math:`\gamma` reaches 1). The selection :math:`s` is a relaxed Bernoulli sample whose
    sharpness :math:`c` rises linearly from ``sharpness[0]`` to ``sharpness[1]`` over training.
    The representation is the posterior mean :math:`\gamma \odot \mu`.
    """

    def __init__(
        self,
        n_in: int,
        widths: Sequence[int],
        n_latent: int,
        prior_spike: float = 0.5,
        sharpness: tuple[float, float] = (50.0, 200.0),
        activation: Activation = nn.ReLU,
    ):
        super().__init__(n_in, widths, n_latent, ["mu", "log_sigma", "spike_logits"], activation)
        self.prior_spike = prior_spike
        self.sharpness_range = sharpness
        self.sharpness = sharpness[0]

    def set_progress(self, fraction: float) -> None:
        """Warm the selection sharpness up from ``sharpness[0]`` to ``sharpness[1]``."""
        start, end = self.sharpness_range
        self.sharpness = start + (end - start) * min(max(fraction, 0.0), 1.0)

    def _encode(
        self, mu: torch.Tensor, h: torch.Tensor, generator: torch.Generator | None
    ) -> LatentOutput:
        log_sigma = self.heads["log_sigma"](h)
        spike_logits = self.heads["spike_logits"](h)
        gamma = torch.sigmoid(spike_logits)
        mean = gamma * mu
        if self.training:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            selection = spike_selection(spike_logits, self.sharpness, generator)
            z = selection * (mu + torch.exp(log_sigma) * eps)
        else:
            z = mean
        slab, spike = spike_slab_kl(mu, log_sigma, spike_logits, self.prior_spike)
        return LatentOutput(
            z=z,
            mean=mean,
            kl={"kl_slab": slab, "kl_spike": spike},
            extras={"spike": gamma, "mu": mu, "log_sigma": log_sigma},
        )

    def draw(self, out: LatentOutput, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""A sample :math:`s \odot (\mu + \sigma \epsilon)`, :math:`s \sim \mathrm{Bern}(\gamma)`.

        The selection :math:`s` is a hard Bernoulli draw: the spike-and-slab posterior itself,
        not the relaxed selection that training differentiates through.
        """
        extras = out.extras
        gamma = extras["spike"]
        u = torch.rand(gamma.shape, generator=generator, device=gamma.device, dtype=gamma.dtype)
        slab = extras["mu"] + torch.exp(extras["log_sigma"]) * _normal(gamma, generator)
        return (u < gamma).to(slab.dtype) * slab
