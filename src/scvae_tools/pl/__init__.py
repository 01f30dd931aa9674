"""Plots: metrics, t-SNE beside k-means, training curves and VSC sparsity."""
