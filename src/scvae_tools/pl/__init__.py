"""Plots: metrics, integration scores, t-SNE and k-means, losses, VSC sparsity, gene programs."""

from ._plots import (
    gene_programs,
    integration_scores,
    loss_curves,
    metrics_heatmap,
    spike_probabilities,
    tsne_kmeans,
)

__all__ = [
    "gene_programs",
    "integration_scores",
    "loss_curves",
    "metrics_heatmap",
    "spike_probabilities",
    "tsne_kmeans",
]
