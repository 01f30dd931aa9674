"""Plots: metrics, integration scores, t-SNE beside k-means, training curves, VSC sparsity."""

from ._plots import (
    integration_scores,
    loss_curves,
    metrics_heatmap,
    spike_probabilities,
    tsne_kmeans,
)

__all__ = [
    "integration_scores",
    "loss_curves",
    "metrics_heatmap",
    "spike_probabilities",
    "tsne_kmeans",
]
