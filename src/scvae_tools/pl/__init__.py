"""Plots: metrics, t-SNE beside k-means, training curves and VSC sparsity."""

from ._plots import loss_curves, metrics_heatmap, spike_probabilities, tsne_kmeans

__all__ = ["loss_curves", "metrics_heatmap", "spike_probabilities", "tsne_kmeans"]
