"""The torch models (:class:`AutoencoderModule`) and fitted-model handling (:func:`load`)."""

from ._latent import DeterministicLatent, GaussianLatent, LatentOutput, SpikeSlabLatent
from ._likelihood import (
    LIKELIHOODS,
    GaussianLikelihood,
    Likelihood,
    NegativeBinomialLikelihood,
    PoissonLikelihood,
    ZINBLikelihood,
)
from ._losses import (
    bernoulli_kl,
    gaussian_kl,
    spike_selection,
    spike_slab_kl,
    squared_error,
    squared_error_gram,
)
from ._model import LatentModel, load
from ._module import AutoencoderModule
from ._nn import Batch, ConditionalMLP, InputLinear, OutputLinear, mlp

__all__ = [
    "LIKELIHOODS",
    "AutoencoderModule",
    "Batch",
    "ConditionalMLP",
    "DeterministicLatent",
    "GaussianLatent",
    "GaussianLikelihood",
    "InputLinear",
    "LatentModel",
    "LatentOutput",
    "Likelihood",
    "NegativeBinomialLikelihood",
    "OutputLinear",
    "PoissonLikelihood",
    "SpikeSlabLatent",
    "ZINBLikelihood",
    "bernoulli_kl",
    "gaussian_kl",
    "load",
    "mlp",
    "spike_selection",
    "spike_slab_kl",
    "squared_error",
    "squared_error_gram",
]
