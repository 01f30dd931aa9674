"""Tools: train the models and evaluate their latent spaces."""

from ._tools import ae, vae, vsc

__all__ = ["ae", "vae", "vsc"]
