"""Tools: train the models, evaluate their latent spaces, read genes off their decoders."""

from ._evaluate import evaluate, tsne3d
from ._expression import gene_programs, normalized_expression, rank_genes_groups
from ._tools import ae, vae, vsc

__all__ = [
    "ae",
    "evaluate",
    "gene_programs",
    "normalized_expression",
    "rank_genes_groups",
    "tsne3d",
    "vae",
    "vsc",
]
