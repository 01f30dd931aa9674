"""scvae-tools: deep AE, β-VAE and β-VSC latent spaces of single-cell data, on AnnData."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, models, pl, pp, tl
from ._training import TrainingDivergedError

try:
    __version__ = version("scvae-tools")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["TrainingDivergedError", "datasets", "models", "pl", "pp", "tl"]
