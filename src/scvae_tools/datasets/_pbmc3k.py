"""``sv.datasets.pbmc3k``: 10x Genomics' 3k PBMCs, downloaded like scanpy or read from disk."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import IO

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.io
import scipy.sparse as sp
from anndata import AnnData
from anndata.utils import make_index_unique

__all__ = ["pbmc3k"]

#: The three files of a Cell Ranger 1.x ("legacy") matrix folder; each may also be gzipped.
_10X_FILES = ("matrix.mtx", "genes.tsv", "barcodes.tsv")
#: Where the legacy folder sits inside 10x's ``pbmc3k_filtered_gene_bc_matrices.tar.gz``.
_10X_SUBFOLDER = Path("filtered_gene_bc_matrices") / "hg19"

_VALID_PATHS = (
    "Pass an .h5ad file (such as scanpy's pbmc3k_raw.h5ad), a 10x legacy folder holding "
    "matrix.mtx, genes.tsv and barcodes.tsv (each optionally .gz; e.g. "
    "'filtered_gene_bc_matrices/hg19'), a folder that contains 'filtered_gene_bc_matrices/hg19', "
    "or no path to download the data with scanpy."
)


def pbmc3k(path: str | Path | None = None) -> AnnData:
    """10x Genomics "3k PBMCs from a Healthy Donor": raw UMI counts, 2,700 cells x 32,738 genes.

    The data set of the Seurat and scanpy PBMC tutorials, and of the write-up this package
    reproduces. The package ships no data: without ``path`` it is downloaded (and cached) by
    :func:`scanpy.datasets.pbmc3k`.

    Parameters
    ----------
    path
        Where to read the data from instead of downloading it. One of

        - an ``.h5ad`` file, such as scanpy's ``pbmc3k_raw.h5ad``;
        - a 10x Cell Ranger 1.x ("legacy") matrix folder, 10x's
          ``filtered_gene_bc_matrices/hg19``, holding ``matrix.mtx`` (genes x cells),
          ``genes.tsv`` (Ensembl ID, gene symbol) and ``barcodes.tsv``, each plain or gzipped
          (``.gz``; :func:`scanpy.read_10x_mtx` reads this layout only uncompressed);
        - a folder that contains ``filtered_gene_bc_matrices/hg19``, e.g. the unpacked
          ``pbmc3k_filtered_gene_bc_matrices.tar.gz``.

        Default None: download with :func:`scanpy.datasets.pbmc3k`.

    Returns
    -------
    AnnData of shape ``(n_obs, n_vars)`` = ``(2700, 32738)`` for the real data, laid out like
    scanpy's:

    ``X`` : :class:`scipy.sparse.csr_matrix` ``(n_obs, n_vars)``, float32
        Raw UMI counts, cells x genes.
    ``obs_names``
        Cell barcodes such as ``"AAACATACAACCAC-1"``.
    ``var_names``
        Gene symbols, made unique by :meth:`anndata.AnnData.var_names_make_unique` (a duplicate
        symbol gets ``-1``, ``-2``, ... appended).
    ``var["gene_ids"]``
        Ensembl gene IDs.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist, or a 10x folder lacks some of its three files (named in the
        message).
    ValueError
        ``path`` is a file that is not ``.h5ad``, or the 10x files disagree on the numbers of
        genes and cells.

    Examples
    --------
    >>> import scvae_tools as sv
    >>> adata = sv.datasets.pbmc3k()  # doctest: +SKIP
    >>> adata = sv.datasets.pbmc3k("data/filtered_gene_bc_matrices/hg19")  # doctest: +SKIP
    """
    if path is None:
        return _as_counts_csr(sc.datasets.pbmc3k())
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No file or folder at {str(path)!r}. {_VALID_PATHS}")
    if path.is_file():
        if path.suffix != ".h5ad":
            raise ValueError(f"{str(path)!r} is a file but not an .h5ad file. {_VALID_PATHS}")
        return _as_counts_csr(ad.read_h5ad(path))
    folder = path
    if not _find_10x_files(folder)[0] and (path / _10X_SUBFOLDER).is_dir():
        folder = path / _10X_SUBFOLDER
    found, missing = _find_10x_files(folder)
    if missing:
        names = ", ".join(f"{name} (or {name}.gz)" for name in missing)
        raise FileNotFoundError(f"The 10x folder {str(folder)!r} lacks {names}. {_VALID_PATHS}")
    return _read_10x_legacy(found)


def _find_10x_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The 10x files present in ``folder`` (plain preferred over gzipped), and those missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in _10X_FILES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            missing.append(name)
    return found, missing


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_10x_legacy(files: dict[str, Path]) -> AnnData:
    with _open(files["matrix.mtx"]) as handle:
        matrix = scipy.io.mmread(handle)  # genes x cells
    with _open(files["genes.tsv"]) as handle:
        genes = pd.read_csv(handle, sep="\t", header=None, dtype=str)
    with _open(files["barcodes.tsv"]) as handle:
        barcodes = pd.read_csv(handle, sep="\t", header=None, dtype=str)[0]
    if genes.shape[1] < 2:
        raise ValueError(
            f"{str(files['genes.tsv'])!r} has {genes.shape[1]} column(s); a legacy 10x genes.tsv "
            "has two, Ensembl ID and gene symbol."
        )
    if matrix.shape != (len(genes), len(barcodes)):
        raise ValueError(
            f"{str(files['matrix.mtx'])!r} is {matrix.shape[0]} x {matrix.shape[1]} (genes x "
            f"cells), but genes.tsv lists {len(genes)} genes and barcodes.tsv {len(barcodes)} "
            "cells. The three files must come from the same 10x folder."
        )
    X = sp.csr_matrix(matrix.T, dtype=np.float32)
    adata = AnnData(
        X,
        obs=pd.DataFrame(index=pd.Index(barcodes.to_numpy(), dtype=str)),
        var=pd.DataFrame(
            {"gene_ids": genes[0].to_numpy()},
            # What AnnData.var_names_make_unique does, before the AnnData exists (no warning).
            index=make_index_unique(pd.Index(genes[1].to_numpy(), dtype=str)),
        ),
    )
    return adata


def _as_counts_csr(adata: AnnData) -> AnnData:
    """``adata`` with ``X`` as float32 CSR (cells x genes), the layout scanpy's loaders give."""
    X = adata.X
    if X is not None and not (sp.isspmatrix_csr(X) and X.dtype == np.float32):
        adata.X = sp.csr_matrix(X, dtype=np.float32)
    return adata
