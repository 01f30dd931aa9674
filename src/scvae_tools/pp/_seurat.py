"""``sv.pp.recipe_seurat`` and ``sv.pp.seurat_clusters``: the write-up's Seurat steps, in scanpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

from .._checks import check_float, check_int
from .._data import check_anndata

__all__ = ["recipe_seurat", "seurat_clusters"]

#: Prefix of the mitochondrial gene symbols of the human references (hg19, GRCh38).
_MITO_PREFIX = "MT-"


def _check_adata(adata: Any) -> None:
    check_anndata(adata)
    if adata.X is None:
        raise ValueError("adata.X is None; put the matrix to process in adata.X.")


def _values(X: Any) -> np.ndarray:
    """The stored values of a dense or sparse matrix (the nonzeros of a sparse one)."""
    return X.data if sp.issparse(X) else np.asarray(X)


def _check_raw_counts(X: Any) -> None:
    values = _values(X)
    if values.dtype.kind not in "biuf":
        raise TypeError(
            f"adata.X has dtype {values.dtype}; recipe_seurat expects raw UMI counts as numbers."
        )
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(
            "adata.X holds NaN or infinite values; recipe_seurat expects raw UMI counts "
            "(non-negative integers)."
        )
    if (values < 0).any():
        raise ValueError(
            f"adata.X holds negative values (min {values.min():g}); recipe_seurat expects raw "
            "UMI counts (non-negative integers), not log-normalised or scaled data. Put the "
            "counts in adata.X (e.g. `adata.X = adata.layers['counts']`) first."
        )
    if values.dtype.kind == "f" and (np.mod(values, 1) != 0).any():
        raise ValueError(
            "adata.X holds non-integer values; recipe_seurat expects raw UMI counts "
            "(non-negative integers), not normalised data. Put the counts in adata.X "
            "(e.g. `adata.X = adata.layers['counts']`) first."
        )


def recipe_seurat(
    adata: AnnData,
    *,
    min_cells: int = 3,
    min_genes: int = 200,
    max_genes: int = 2500,
    max_pct_mito: float = 5.0,
    target_sum: float = 1e4,
    copy: bool = False,
) -> AnnData | None:
    """Seurat's QC and LogNormalize, as in the write-up and the Seurat PBMC3k tutorial.

    In order:

    1. keep genes detected (count > 0) in at least ``min_cells`` cells;
    2. keep cells with ``min_genes < n_genes_by_counts < max_genes`` (both strict, Seurat's
       ``nFeature_RNA > 200 & nFeature_RNA < 2500``; genes counted after step 1) and
       ``pct_counts_mt < max_pct_mito`` (genes whose symbol starts with ``"MT-"``);
    3. store the counts of the kept cells and genes in ``layers["counts"]``;
    4. LogNormalize: ``X = log1p(counts / cell total * target_sum)``.

    On PBMC3k (:func:`scvae_tools.datasets.pbmc3k`) this gives exactly 2,638 cells x 13,714 genes.
    Like scanpy's recipes, it works in place unless ``copy=True``.

    Parameters
    ----------
    adata
        Raw UMI counts of shape ``(n_obs, n_vars)`` in ``adata.X`` (dense or sparse, integer or
        float holding whole numbers); ``var_names`` are gene symbols.
    min_cells
        Keep genes detected in at least this many cells. Default 3.
    min_genes
        Keep cells detecting more than this many genes. Default 200.
    max_genes
        Keep cells detecting fewer than this many genes (drops likely doublets). Default 2500.
    max_pct_mito
        Keep cells with less than this percentage of counts on ``"MT-"`` genes (drops dying
        cells). Default 5.0.
    target_sum
        Counts per cell after normalisation, before ``log1p``. Default 1e4 (Seurat's
        ``scale.factor``).
    copy
        Work on a copy of ``adata`` and return it, leaving ``adata`` untouched. Default False.

    Returns
    -------
    None, or the processed copy with ``copy=True``. ``adata`` is subset to the kept cells and genes,
    shape ``(n_kept_obs, n_kept_vars)``, and gets:

    ``X`` : :class:`scipy.sparse.csr_matrix`, float32
        ``log1p(counts / total * target_sum)``, natural log.
    ``layers["counts"]`` : :class:`scipy.sparse.csr_matrix`, float32
        The raw counts of the kept cells and genes.
    ``obs``
        ``n_genes_by_counts``, ``total_counts``, ``total_counts_mt``, ``pct_counts_mt``
        (:func:`scanpy.pp.calculate_qc_metrics`, over the genes kept by step 1).
    ``var``
        ``n_cells`` (cells detecting the gene), ``mt`` (bool), and the per-gene QC metrics of
        :func:`scanpy.pp.calculate_qc_metrics`; all computed over every input cell, before the
        cell filter.
    ``uns["log1p"]``
        As :func:`scanpy.pp.log1p` writes it.
    ``uns["recipe_seurat"]`` : :class:`dict`
        ``params``: the arguments, plus ``n_obs_before``/``n_vars_before`` and
        ``n_obs``/``n_vars`` after.

    Raises
    ------
    TypeError
        ``adata`` is not an AnnData, or a parameter has the wrong type.
    ValueError
        An empty AnnData; ``X`` is not raw counts (negative, non-integer or non-finite values);
        the filters keep no cell or no gene. Nothing is modified in these cases.
    """
    _check_adata(adata)
    min_cells = check_int("min_cells", min_cells, minimum=0)
    min_genes = check_int("min_genes", min_genes, minimum=0)
    max_genes = check_int("max_genes", max_genes, minimum=1)
    max_pct_mito = check_float("max_pct_mito", max_pct_mito, low=0.0, open_low=True)
    target_sum = check_float("target_sum", target_sum, low=0.0, open_low=True)
    if max_genes <= min_genes + 1:
        raise ValueError(
            f"No cell can have min_genes < n_genes < max_genes with min_genes={min_genes} and "
            f"max_genes={max_genes}; raise `max_genes`."
        )
    _check_raw_counts(adata.X)

    # Every filter is computed before anything is written, so a filter that keeps nothing
    # leaves the input untouched.
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    counts.eliminate_zeros()
    n_cells = np.bincount(counts.indices, minlength=adata.n_vars)
    gene_mask = n_cells >= min_cells
    if not gene_mask.any():
        raise ValueError(
            f"No gene is detected in >= {min_cells} cells (min_cells={min_cells}); lower "
            "`min_cells`."
        )
    kept = counts[:, gene_mask]
    n_genes = np.diff(kept.indptr)
    total = np.asarray(kept.sum(axis=1)).ravel()
    mito = np.asarray(adata.var_names[gene_mask].str.startswith(_MITO_PREFIX))
    mito_total = np.asarray(kept[:, mito].sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        pct_mito = np.where(total > 0, mito_total / total * 100, 0.0)
    cell_mask = (n_genes > min_genes) & (n_genes < max_genes) & (pct_mito < max_pct_mito)
    if not cell_mask.any():
        raise ValueError(
            f"No cell passes the QC ({min_genes} < n_genes < {max_genes}, pct mito < "
            f"{max_pct_mito:g}); n_genes ranges {n_genes.min()}-{n_genes.max()}. Check that "
            "adata.X holds the raw counts of cells x genes, or relax the thresholds."
        )

    target = adata.copy() if copy else adata
    if target.is_view:  # in place on a view: make it an actual AnnData first, as scanpy does
        target._init_as_actual(target.copy())
    n_obs_before, n_vars_before = target.shape
    target.X = counts
    # Same subsetting as sc.pp.filter_genes / filter_cells (in place, keeps obs/var/obsm/...).
    target._inplace_subset_var(gene_mask)
    target.var["n_cells"] = n_cells[gene_mask]
    target.var["mt"] = mito
    sc.pp.calculate_qc_metrics(target, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    target._inplace_subset_obs(cell_mask)
    target.layers["counts"] = target.X.copy()
    sc.pp.normalize_total(target, target_sum=target_sum)
    sc.pp.log1p(target)
    target.X = sp.csr_matrix(target.X, dtype=np.float32)
    target.uns["recipe_seurat"] = {
        "params": {
            "min_cells": min_cells,
            "min_genes": min_genes,
            "max_genes": max_genes,
            "max_pct_mito": max_pct_mito,
            "target_sum": target_sum,
            "n_obs_before": int(n_obs_before),
            "n_vars_before": int(n_vars_before),
            "n_obs": int(target.n_obs),
            "n_vars": int(target.n_vars),
        }
    }
    return target if copy else None


def seurat_clusters(
    adata: AnnData,
    *,
    n_top_genes: int = 2000,
    n_pcs: int = 10,
    n_neighbors: int = 15,
    resolution: float = 0.5,
    random_state: int = 0,
    key_added: str = "seurat_clusters",
) -> None:
    """The write-up's Seurat graph clustering of log-normalised cells, done in scanpy.

    On a private copy of ``adata.X``: the ``n_top_genes`` highly variable genes
    (:func:`scanpy.pp.highly_variable_genes`, ``flavor="seurat"``), scaled to unit variance
    and clipped at 10 (Seurat's ``ScaleData``), PCA, a ``n_neighbors`` nearest-neighbour graph on
    the first ``n_pcs`` PCs, and Leiden at ``resolution`` (``flavor="igraph"``, iterated until
    it converges). Only the cluster labels and their parameters are written back.

    On PBMC3k after :func:`recipe_seurat` this gives the write-up's 9 clusters; their adjusted
    Rand index against the write-up's own Seurat labels is 0.72 (Seurat's vst gene selection, SNN
    graph and Louvain are not available in scanpy without extra dependencies, so the labels are
    close, not identical).

    Parameters
    ----------
    adata
        Log-normalised expression of shape ``(n_obs, n_vars)`` in ``adata.X``, as
        :func:`recipe_seurat` leaves it.
    n_top_genes
        Number of highly variable genes (all genes when there are fewer). Default 2000.
    n_pcs
        Principal components the neighbour graph is built on. Default 10.
    n_neighbors
        Neighbours per cell in the graph (:func:`scanpy.pp.neighbors`). Default 15: of 15 and 20
        (Seurat's ``k.param``), 15 agrees better with the write-up's clusters.
    resolution
        Leiden resolution; higher gives more clusters. Default 0.5.
    random_state
        Seed of the PCA, the neighbour search and Leiden. The global NumPy random state is left
        untouched.
    key_added
        Name of the ``obs`` column and the ``uns`` entry written. Default ``"seurat_clusters"``.

    Returns
    -------
    None. Sets:

    ``adata.obs[key_added]`` : :class:`pandas.Categorical` ``(n_obs,)``
        Cluster labels ``"0"``, ``"1"``, ... numbered by decreasing size, ``"0"`` the largest,
        as Seurat numbers them.
    ``adata.uns[key_added]`` : :class:`dict`
        ``params``: every argument that shaped the result, the fixed choices (``hvg_flavor``,
        ``scale_max_value``, ``leiden_flavor``, ``n_iterations``), and ``n_clusters``.

    Nothing else of ``adata`` changes (``X``, ``var``, ``obsm``, ``obsp`` and other ``uns``
    entries are untouched).

    Raises
    ------
    TypeError
        ``adata`` is not an AnnData, or a parameter has the wrong type.
    ValueError
        An empty AnnData, ``adata.X`` with NaN/infinite values or raw integer counts (run
        :func:`recipe_seurat` first), or ``n_pcs`` not below ``min(n_obs, n_hvg)``.
    """
    _check_adata(adata)
    n_top_genes = check_int("n_top_genes", n_top_genes, minimum=1)
    n_pcs = check_int("n_pcs", n_pcs, minimum=1)
    n_neighbors = check_int("n_neighbors", n_neighbors, minimum=2)
    resolution = check_float("resolution", resolution, low=0.0, open_low=True)
    random_state = check_int("random_state", random_state, minimum=0)
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"`key_added` must be a non-empty string, got {key_added!r}.")

    X = adata.X
    values = _values(X)
    if values.dtype.kind not in "biuf":
        raise TypeError(f"adata.X has dtype {values.dtype}; a numeric matrix is needed.")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError("adata.X holds NaN or infinite values; clean or recompute it first.")
    if values.size and values.max() > 1 and (np.mod(values, 1) == 0).all():
        raise ValueError(
            "adata.X looks like raw counts (whole numbers); seurat_clusters expects "
            "log-normalised data. Run `sv.pp.recipe_seurat(adata)` first."
        )
    n_hvg = min(n_top_genes, adata.n_vars)
    if n_pcs >= min(adata.n_obs, n_hvg):
        raise ValueError(
            f"n_pcs={n_pcs} must be below min(n_obs, n_top_genes) = {min(adata.n_obs, n_hvg)}; "
            "lower `n_pcs`."
        )
    if n_neighbors >= adata.n_obs:
        raise ValueError(
            f"n_neighbors={n_neighbors} must be below the number of cells ({adata.n_obs})."
        )

    work = AnnData(
        sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.array(X, dtype=np.float32),
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )
    if "log1p" in adata.uns:  # the log base, read by highly_variable_genes
        work.uns["log1p"] = dict(adata.uns["log1p"])
    # scanpy's PCA and neighbours may draw from the global NumPy state: restore it afterwards.
    numpy_state = np.random.get_state()  # noqa: NPY002
    try:
        if n_hvg < work.n_vars:
            sc.pp.highly_variable_genes(work, n_top_genes=n_hvg, flavor="seurat")
            work = work[:, work.var["highly_variable"].to_numpy()].copy()
        if sp.issparse(work.X):  # scaling centres the genes: dense anyway
            work.X = work.X.toarray()
        sc.pp.scale(work, max_value=10)
        sc.pp.pca(work, n_comps=n_pcs, random_state=random_state)
        sc.pp.neighbors(work, n_neighbors=n_neighbors, n_pcs=n_pcs, random_state=random_state)
        sc.tl.leiden(
            work,
            resolution=resolution,
            flavor="igraph",
            n_iterations=-1,
            directed=False,
            random_state=random_state,
            key_added="leiden",
        )
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002

    # Renumber by decreasing size, "0" the largest, as Seurat does (ties keep Leiden's order).
    raw = work.obs["leiden"].astype(str).to_numpy()
    sizes = pd.Series(raw).value_counts(sort=False)
    order = sorted(sizes.index, key=lambda c: (-sizes[c], int(c)))
    rename = {old: str(new) for new, old in enumerate(order)}
    labels = pd.Categorical(
        [rename[c] for c in raw], categories=[str(i) for i in range(len(order))]
    )
    adata.obs[key_added] = pd.Series(labels, index=adata.obs_names)
    adata.uns[key_added] = {
        "params": {
            "n_top_genes": n_hvg,
            "n_pcs": n_pcs,
            "n_neighbors": n_neighbors,
            "resolution": resolution,
            "random_state": random_state,
            "hvg_flavor": "seurat",
            "scale_max_value": 10.0,
            "leiden_flavor": "igraph",
            "n_iterations": -1,
            "n_clusters": len(order),
        }
    }
