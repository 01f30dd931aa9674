"""Preprocessing: the write-up's Seurat recipe and clustering, in scanpy."""
