"""Datasets: PBMC3k the way scanpy gets it, or from a local 10x folder or h5ad."""

from ._pbmc3k import pbmc3k

__all__ = ["pbmc3k"]
