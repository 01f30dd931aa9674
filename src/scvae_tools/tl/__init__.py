"""Tools: train the models and evaluate their latent spaces."""

from ._evaluate import evaluate, tsne3d
from ._tools import ae, vae, vsc

__all__ = ["ae", "evaluate", "tsne3d", "vae", "vsc"]
