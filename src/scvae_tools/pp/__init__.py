"""Preprocessing: the write-up's Seurat recipe and clustering, in scanpy."""

from ._seurat import recipe_seurat, seurat_clusters

__all__ = ["recipe_seurat", "seurat_clusters"]
