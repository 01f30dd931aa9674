"""Small synthetic data sets shared by the core tests."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

SHARED_PBMC3K = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc3k"


def clustered_counts(n_cells: int = 240, n_genes: int = 60, n_groups: int = 3, seed: int = 0):
    """Poisson counts with group-specific gene programmes, and the group of each cell."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n_cells)
    base = rng.gamma(1.0, 1.0, size=(n_groups, n_genes))
    base[np.arange(n_groups)[:, None], rng.integers(0, n_genes, (n_groups, 8))] += 6.0
    counts = rng.poisson(base[groups]).astype(np.float32)
    return counts, groups


def log_adata(n_cells: int = 240, n_genes: int = 60, seed: int = 0, sparse: bool = True):
    """A log-normalised AnnData with a ``group`` column, CSR by default."""
    counts, groups = clustered_counts(n_cells, n_genes, seed=seed)
    logged = np.log1p(counts / counts.sum(1, keepdims=True).clip(1) * 100).astype(np.float32)
    adata = ad.AnnData(
        sp.csr_matrix(logged) if sparse else logged,
        obs=pd.DataFrame(
            {"group": pd.Categorical(groups.astype(str))},
            index=[f"cell{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]),
    )
    adata.layers["counts"] = sp.csr_matrix(counts)
    return adata


def two_batch_counts(n_cells: int = 400, n_genes: int = 80, n_groups: int = 3, seed: int = 0):
    """Counts of ``n_groups`` cell types in two batches with a strong batch effect.

    Every gene's expression is multiplied by a batch-specific factor (log-normal, sd 1), so
    that without correction cells group by batch as much as by type. ``X`` holds the raw
    counts (CSR); ``obs`` has ``group`` (the label) and ``batch`` (``"b0"``, ``"b1"``).
    """
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n_cells)
    batches = rng.integers(0, 2, n_cells)
    base = rng.gamma(1.0, 1.0, size=(n_groups, n_genes))
    base[np.arange(n_groups)[:, None], rng.integers(0, n_genes, (n_groups, 8))] += 6.0
    effect = np.exp(rng.normal(0.0, 1.0, size=(2, n_genes)))
    counts = rng.poisson(base[groups] * effect[batches]).astype(np.float32)
    return ad.AnnData(
        sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {
                "group": pd.Categorical(groups.astype(str)),
                "batch": pd.Categorical(np.array(["b0", "b1"])[batches]),
            },
            index=[f"cell{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]),
    )


def knn_fractions(rep: np.ndarray, obs: pd.DataFrame, k: int = 15) -> tuple[float, float]:
    """Mean fraction of each cell's ``k`` nearest neighbours from the other batch, and with
    the same ``group`` (batch mixing, label purity)."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(rep).kneighbors(rep, return_distance=False)[:, 1:]
    batch = obs["batch"].to_numpy()
    group = obs["group"].to_numpy()
    mixing = float((batch[idx] != batch[:, None]).mean())
    return mixing, float((group[idx] == group[:, None]).mean())
