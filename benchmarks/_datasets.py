"""The benchmarks' data registry: one entry per data set, name -> loader -> label and batch.

Every benchmark reads its data through :data:`DATASETS`: a new data set is one more entry here,
not a new script. A loader returns an AnnData with

- ``X``: log-normalised values (``normalize_total`` to 10,000 and ``log1p``), float32 CSR,
  except ``pbmc68k_reduced``, whose bundled ``X`` is already Seurat's scaled HVG matrix;
- ``layers["counts"]``: the raw counts of the same cells and genes, where the source has them;
- ``obs["label"]``: the cell labels to score against (categorical);
- ``obs["batch"]``: the batch (multi-batch sets only, categorical).

Every set keeps the 2,000 ``seurat_v3`` HVGs of its counts (chosen per batch in the multi-batch
sets; all genes where a set has fewer), except four: ``pbmc68k_reduced`` comes with 765, and
``pbmc3k``, ``celseq2_all`` and ``sortseq_all`` keep every gene detected in at least 3 cells
(13,656, 14,804 and 15,571), as a user who calls ``sv.tl.vae(adata)`` right after ``log1p``
would. So the models meet 765, 1,047, 2,000 and 13,656-15,571 genes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from _common import PBMC3K_DIR, SHARED_DATA, load_pbmc3k, seed_clusters

CELLBENCH_DIR = SHARED_DATA / "cellbench_rnamix"
DING_FILE = SHARED_DATA / "ding_pbmc" / "ding_pbmc_dropseq_indrops.h5ad"
MESC_FILE = SHARED_DATA / "mesc_kolodziejczyk" / "mesc_2i_a2i_lif.h5ad"
N_HVG = 2000

Kind = Literal["single", "batches"]


@dataclass(frozen=True)
class DataSet:
    """One entry of the registry.

    Attributes
    ----------
    name
        Short identifier, used on the command line and in the tables.
    kind
        ``"single"`` (one sample, scored against PCA) or ``"batches"`` (scored by scIB
        against PCA, Harmony and scVI).
    load
        Returns the AnnData described in the module's docstring.
    description
        One line for the report.
    labels_from_pca
        Whether the labels were clustered from a PCA of the same cells (which favours PCA);
        such sets are reported beside the others, not held to the single-sample targets.
    needs
        Files under ``../shared/data`` that the loader reads (None: bundled with scanpy).
    """

    name: str
    kind: Kind
    load: Callable[[], sc.AnnData]
    description: str
    labels_from_pca: bool = False
    needs: Path | None = None

    def available(self) -> bool:
        """Whether the data set can be loaded here."""
        return self.needs is None or self.needs.exists()


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def log_normalise(adata: sc.AnnData) -> sc.AnnData:
    """``layers["counts"]`` = the counts in ``X``; ``X`` = ``log1p(normalize_total(1e4))``."""
    adata.layers["counts"] = sp.csr_matrix(adata.X, dtype=np.float32)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def as_categories(adata: sc.AnnData) -> sc.AnnData:
    for key in ("label", "batch"):
        if key in adata.obs:
            adata.obs[key] = pd.Categorical(adata.obs[key].astype(str))
    return adata


def from_counts(counts: sc.AnnData, n_top: int | None = N_HVG) -> sc.AnnData:
    """Genes in >= 3 cells, their ``n_top`` ``seurat_v3`` HVGs (per batch where there is a
    ``batch`` column; None: all genes), log-normalised."""
    adata = as_categories(counts.copy())
    sc.pp.filter_genes(adata, min_cells=3)
    if n_top is not None and adata.n_vars > n_top:
        # seurat_v3's loess fit is singular on a few hundred cells at its default span.
        sc.pp.highly_variable_genes(
            adata,
            flavor="seurat_v3",
            n_top_genes=n_top,
            batch_key="batch" if "batch" in adata.obs else None,
            span=0.3 if adata.n_obs >= 500 else 1.0,
        )
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    adata.var = adata.var[[]]
    return log_normalise(adata)


def drop_labels(adata: sc.AnnData, batch: str, labels: list[str]) -> sc.AnnData:
    """The cells of ``labels`` removed from ``batch`` only: a partial overlap of populations."""
    gone = (adata.obs["batch"].astype(str) == batch) & adata.obs["label"].astype(str).isin(labels)
    if not gone.any():
        raise ValueError(f"no cell of {labels} in batch {batch!r}")
    return adata[~gone.to_numpy()].copy()


def _require(path: Path) -> None:
    if not path.exists():
        sys.exit(f"{path} not found; this data set needs ../shared/data beside the clone.")


# --------------------------------------------------------------------------------------------
# The sources
# --------------------------------------------------------------------------------------------


def cellbench_counts(protocols: tuple[str, ...] = ("celseq2", "sortseq")) -> sc.AnnData:
    """CellBench RNA mixtures: raw counts, ``label`` = mixture, ``batch`` = protocol (with
    more than one)."""
    import anndata as ad

    _require(CELLBENCH_DIR)
    parts = []
    for protocol in protocols:
        counts = pd.read_csv(CELLBENCH_DIR / f"RNAmix_{protocol}.count.csv.gz", index_col=0)
        meta = pd.read_csv(CELLBENCH_DIR / f"RNAmix_{protocol}.metadata.csv.gz", index_col=0)
        meta = meta.loc[counts.columns]
        a = ad.AnnData(
            sp.csr_matrix(counts.T.to_numpy().astype(np.float32)),
            obs=pd.DataFrame(index=protocol + "_" + meta.index.astype(str)),
        )
        a.var_names = counts.index
        a.obs["batch"] = protocol
        mix = meta[["H2228_prop", "H1975_prop", "HCC827_prop"]].astype(str)
        a.obs["label"] = mix.agg("/".join, axis=1).to_numpy()
        parts.append(a)
    if len(parts) == 1:
        del parts[0].obs["batch"]
        return parts[0]
    return ad.concat(parts, join="inner")


def pbmc3k_counts() -> sc.AnnData:
    """The 2,638 PBMC3k cells of the Seurat recipe, 13,714 genes, raw counts."""
    _require(PBMC3K_DIR / "pbmc3k_raw.h5ad")
    adata, _ = load_pbmc3k(PBMC3K_DIR)
    return sc.AnnData(
        adata.layers["counts"].astype(np.float32),
        obs=adata.obs[[]].copy(),
        var=adata.var[[]].copy(),
    )


def pbmc3k_celltypes() -> sc.AnnData:
    """All of PBMC3k, labelled by the Seurat tutorial's cell types."""
    adata = pbmc3k_counts()
    types = pd.read_csv(PBMC3K_DIR / "pbmc3k_seurat_celltypes.csv", index_col="barcode")
    adata.obs["label"] = types["cell_type"].reindex(adata.obs_names).to_numpy()
    return from_counts(adata, n_top=None)


def pbmc3k_draw(n_cells: int, seed: int = 0) -> sc.AnnData:
    """``n_cells`` PBMC3k cells drawn at random, labelled by the write-up's Seurat clusters."""
    adata = pbmc3k_counts()
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False))
    adata = adata[rows].copy()
    adata.obs["label"] = seed_clusters(adata)
    return from_counts(adata)


def pbmc68k_reduced() -> sc.AnnData:
    """scanpy's bundled 700 PBMCs: ``X`` is Seurat's scaled matrix of 765 HVGs; FACS labels."""
    adata = sc.datasets.pbmc68k_reduced()
    adata.obs["label"] = adata.obs["bulk_labels"]
    return as_categories(adata)


def pbmc3k_two_batches_counts(sd: float = 0.5, seed: int = 0) -> sc.AnnData:
    """PBMC3k with half its cells moved to batch ``B`` by a known per-gene effect.

    Each gene g gets a factor f_g = exp(N(0, sd^2)); a batch-B cell's count x becomes
    Binomial(x, min(f_g, 1)) + Poisson(x * max(f_g - 1, 0)), an integer with mean f_g x.
    Labels: the write-up's 9 Seurat clusters, named by their cell types.
    """
    adata = pbmc3k_counts()
    rng = np.random.default_rng(seed)
    counts = adata.X.tocsr().astype(np.float32)
    in_b = rng.permutation(adata.n_obs) < adata.n_obs // 2
    factors = np.exp(rng.normal(0.0, sd, adata.n_vars))
    coo = counts.tocoo()
    hit = in_b[coo.row]
    f = factors[coo.col[hit]]
    x = coo.data[hit].astype(np.int64)
    data = coo.data.copy()
    data[hit] = rng.binomial(x, np.minimum(f, 1.0)) + rng.poisson(x * np.maximum(f - 1.0, 0.0))
    counts = sp.csr_matrix((data, (coo.row, coo.col)), shape=counts.shape, dtype=np.float32)
    counts.eliminate_zeros()
    out = sc.AnnData(counts, obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    out.obs["batch"] = np.where(in_b, "B", "A")
    names = pd.read_csv(PBMC3K_DIR / "pbmc3k_seed_clusters.csv", index_col="barcode")
    out.obs["label"] = names["seed_cell_type"].reindex(out.obs_names).to_numpy()
    return out


def ding_pbmc() -> sc.AnnData:
    """Ding et al. PBMCs on Drop-seq and inDrops, 3 cell types (counts reconstructed)."""
    _require(DING_FILE)
    adata = sc.read_h5ad(DING_FILE)
    adata.obs["label"] = adata.obs["cell_type"]
    return adata


def mesc() -> sc.AnnData:
    """Mouse ES cells in 2i, a2i and serum/LIF, two batches, read counts."""
    _require(MESC_FILE)
    adata = sc.read_h5ad(MESC_FILE)
    adata.obs["label"] = adata.obs["condition"]
    return adata


def synthetic_batches(
    n_batches: int = 8,
    n_types: int = 6,
    n_genes: int = 2000,
    seed: int = 0,
) -> sc.AnnData:
    """Counts of ``n_types`` populations over ``n_batches`` batches that share some of them.

    Each population has its own expression profile: a gene-wise baseline (log-normal) with
    60 marker genes raised 3-8 fold. Each batch has a sequencing depth (median 500 to 8,000
    counts per cell, log-uniform) and a gene-wise effect (``exp(N(0, 0.4^2))`` per gene); cell
    totals vary log-normally around the batch's median. Populations 0 and 1 are in every batch;
    each other population is in a random 2 to ``n_batches - 1`` of them, and the last in one
    batch only. Counts are negative binomial (inverse dispersion 5) with those means.
    """
    rng = np.random.default_rng(seed)
    base = rng.lognormal(-9.0, 1.3, n_genes)
    profiles = np.tile(base, (n_types, 1))
    for t in range(n_types):
        markers = rng.choice(n_genes, 60, replace=False)
        profiles[t, markers] *= rng.uniform(3.0, 8.0, 60)
    profiles /= profiles.sum(1, keepdims=True)
    members = np.zeros((n_batches, n_types), dtype=bool)
    members[:, :2] = True
    for t in range(2, n_types - 1):
        k = rng.integers(2, n_batches)
        members[rng.choice(n_batches, k, replace=False), t] = True
    members[rng.integers(n_batches), n_types - 1] = True
    depth = np.exp(rng.uniform(np.log(500), np.log(8000), n_batches))
    effects = np.exp(rng.normal(0.0, 0.4, (n_batches, n_genes)))
    rows, obs = [], []
    for b in range(n_batches):
        types = np.flatnonzero(members[b])
        n = int(rng.integers(200, 500))
        labels = rng.choice(types, n)
        totals = depth[b] * rng.lognormal(0.0, 0.3, n)
        mean = profiles[labels] * effects[b]
        mean = mean / mean.sum(1, keepdims=True) * totals[:, None]
        theta = 5.0
        counts = rng.poisson(rng.gamma(theta, mean / theta))
        rows.append(sp.csr_matrix(counts.astype(np.float32)))
        obs.append(pd.DataFrame({"label": [f"type{t}" for t in labels], "batch": f"batch{b}"}))
    obs_df = pd.concat(obs, ignore_index=True)
    obs_df.index = [f"cell{i}" for i in range(len(obs_df))]
    adata = sc.AnnData(sp.vstack(rows).tocsr(), obs=obs_df)
    adata.var_names = [f"gene{g}" for g in range(n_genes)]
    return adata


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

#: PBMC3k's cluster names of the populations removed from one half in ``pbmc3k_partial``.
PBMC3K_REMOVED = ["B", "CD14+ Mono"]
#: Mixtures removed from SORT-seq in ``cellbench_partial``: a pure line and a mix.
CELLBENCH_REMOVED = ["0/1/0", "0.68/0.16/0.16"]

_ENTRIES = [
    DataSet(
        "pbmc68k_reduced",
        "single",
        pbmc68k_reduced,
        "scanpy's bundled 700 PBMCs, 765 scaled HVGs, FACS-sorted bulk_labels",
    ),
    *(
        DataSet(
            protocol,
            "single",
            partial(lambda p: from_counts(cellbench_counts((p,))), protocol),
            f"CellBench RNA mixtures on {name} alone, 7 mixtures",
            needs=CELLBENCH_DIR,
        )
        for protocol, name in (("celseq2", "CEL-seq2"), ("sortseq", "SORT-seq"))
    ),
    *(
        DataSet(
            f"{protocol}_all",
            "single",
            partial(lambda p: from_counts(cellbench_counts((p,)), n_top=None), protocol),
            f"the same {name} cells with every gene detected in >= 3 cells",
            needs=CELLBENCH_DIR,
        )
        for protocol, name in (("celseq2", "CEL-seq2"), ("sortseq", "SORT-seq"))
    ),
    *(
        DataSet(
            f"pbmc3k_{n}",
            "single",
            partial(pbmc3k_draw, n),
            f"{n} PBMC3k cells drawn at random, the write-up's 9 Seurat clusters",
            labels_from_pca=True,
            needs=PBMC3K_DIR,
        )
        for n in (150, 300, 1000)
    ),
    DataSet(
        "pbmc3k",
        "single",
        pbmc3k_celltypes,
        "all 2,638 PBMC3k cells, the Seurat tutorial's 9 cell types",
        labels_from_pca=True,
        needs=PBMC3K_DIR,
    ),
    DataSet(
        "cellbench",
        "batches",
        lambda: from_counts(cellbench_counts()),
        "CellBench RNA mixtures, CEL-seq2 against SORT-seq",
        needs=CELLBENCH_DIR,
    ),
    DataSet(
        "cellbench_partial",
        "batches",
        lambda: from_counts(drop_labels(cellbench_counts(), "sortseq", CELLBENCH_REMOVED)),
        "the same, with two mixtures (pure H1975, H2228-rich) absent from SORT-seq",
        needs=CELLBENCH_DIR,
    ),
    DataSet(
        "pbmc3k_batches",
        "batches",
        lambda: from_counts(pbmc3k_two_batches_counts()),
        "PBMC3k split in two, a known per-gene effect (log-normal, sd 0.5) on one half",
        labels_from_pca=True,
        needs=PBMC3K_DIR,
    ),
    DataSet(
        "pbmc3k_partial",
        "batches",
        lambda: from_counts(drop_labels(pbmc3k_two_batches_counts(), "B", PBMC3K_REMOVED)),
        "the same, with B cells and CD14+ monocytes absent from the shifted half",
        labels_from_pca=True,
        needs=PBMC3K_DIR,
    ),
    DataSet(
        "ding_pbmc",
        "batches",
        lambda: from_counts(ding_pbmc()),
        "PBMCs on Drop-seq and inDrops, 3 cell types (Ding et al. 2020)",
        needs=DING_FILE,
    ),
    DataSet(
        "mesc",
        "batches",
        lambda: from_counts(mesc()),
        "mouse ES cells in 2i, a2i and serum/LIF, two batches, read counts",
        needs=MESC_FILE,
    ),
    DataSet(
        "synthetic",
        "batches",
        lambda: from_counts(synthetic_batches()),
        "synthetic NB counts: 8 batches of different depths and gene-wise effects, "
        "6 populations, 4 of them in only some batches",
    ),
]

#: Every data set, by name.
DATASETS: dict[str, DataSet] = {d.name: d for d in _ENTRIES}
