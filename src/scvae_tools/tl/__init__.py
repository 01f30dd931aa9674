"""Tools: train, map queries, evaluate latent spaces, read genes off the decoders."""

from ._evaluate import evaluate, tsne3d
from ._expression import gene_programs, normalized_expression, rank_genes_groups
from ._mapping import map_query, transfer_labels
from ._tools import ae, vae, vsc

__all__ = [
    "ae",
    "evaluate",
    "gene_programs",
    "map_query",
    "normalized_expression",
    "rank_genes_groups",
    "transfer_labels",
    "tsne3d",
    "vae",
    "vsc",
]
