"""Tools: train the models, map query data onto them and evaluate their latent spaces."""

from ._evaluate import evaluate, tsne3d
from ._mapping import map_query, transfer_labels
from ._tools import ae, vae, vsc

__all__ = ["ae", "evaluate", "map_query", "transfer_labels", "tsne3d", "vae", "vsc"]
