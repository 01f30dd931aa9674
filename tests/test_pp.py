"""sv.datasets.pbmc3k, sv.pp.recipe_seurat and sv.pp.seurat_clusters."""

from __future__ import annotations

import gzip
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from _synthetic import SHARED_PBMC3K, log_adata
from sklearn.metrics import adjusted_rand_score

import scvae_tools as sv

HG19 = SHARED_PBMC3K / "filtered_gene_bc_matrices" / "hg19"
real_data = pytest.mark.skipif(
    not SHARED_PBMC3K.exists(),
    reason=f"shared PBMC3k data not found at {SHARED_PBMC3K} (see shared/data/README.md)",
)
#: Measured: 0.720 (scanpy 1.11.5, igraph 1.0); the margin covers solver and platform noise.
MIN_ARI = 0.67


@pytest.fixture(scope="module")
def raw() -> ad.AnnData:
    return sv.datasets.pbmc3k(SHARED_PBMC3K / "pbmc3k_raw.h5ad")


@pytest.fixture(scope="module")
def processed(raw) -> ad.AnnData:
    return sv.pp.recipe_seurat(raw, copy=True)


def _counts(n_cells: int = 60, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    return ad.AnnData(
        sp.csr_matrix(X),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"MT-{j}" if j < 2 else f"g{j}" for j in range(n_genes)]),
    )


# --- datasets ------------------------------------------------------------------------------


@real_data
def test_pbmc3k_gzipped_10x_equals_h5ad(raw):
    tenx = sv.datasets.pbmc3k(HG19)
    assert tenx.shape == raw.shape == (2700, 32738)
    assert sp.isspmatrix_csr(tenx.X) and tenx.X.dtype == np.float32
    assert tenx.X.sum() == raw.X.sum() == 6_390_631
    assert (tenx.X != raw.X).nnz == 0
    assert tenx.var_names.equals(raw.var_names) and tenx.var_names.is_unique
    assert tenx.obs_names.equals(raw.obs_names)
    assert tenx.obs_names[0] == "AAACATACAACCAC-1"
    assert (tenx.var["gene_ids"] == raw.var["gene_ids"]).all()
    # The folder that holds filtered_gene_bc_matrices/hg19 works too.
    assert sv.datasets.pbmc3k(SHARED_PBMC3K).shape == (2700, 32738)


@real_data
def test_pbmc3k_uncompressed_10x(tmp_path, raw):
    for name in ("matrix.mtx", "genes.tsv", "barcodes.tsv"):
        with gzip.open(HG19 / f"{name}.gz", "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain = sv.datasets.pbmc3k(str(tmp_path))
    assert plain.shape == (2700, 32738)
    assert (plain.X != raw.X).nnz == 0
    assert plain.var_names.equals(raw.var_names)
    assert plain.obs_names.equals(raw.obs_names)


def test_pbmc3k_no_path_uses_scanpy(monkeypatch):
    calls = []
    fake = ad.AnnData(sp.csc_matrix(np.array([[1, 0], [2, 3]], dtype=np.int64)))

    def fake_pbmc3k():
        calls.append(True)
        return fake

    monkeypatch.setattr(sc.datasets, "pbmc3k", fake_pbmc3k)
    out = sv.datasets.pbmc3k()
    assert calls == [True]
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    np.testing.assert_array_equal(out.X.toarray(), [[1, 0], [2, 3]])


def test_pbmc3k_missing_files(tmp_path):
    (tmp_path / "genes.tsv").write_text("ENSG1\tA\n")
    with pytest.raises(FileNotFoundError, match=r"matrix\.mtx.*barcodes\.tsv.*h5ad"):
        sv.datasets.pbmc3k(tmp_path)
    with pytest.raises(FileNotFoundError, match="No file or folder"):
        sv.datasets.pbmc3k(tmp_path / "nope.h5ad")
    (tmp_path / "data.csv").write_text("x\n")
    with pytest.raises(ValueError, match=r"not an \.h5ad"):
        sv.datasets.pbmc3k(tmp_path / "data.csv")


# --- recipe_seurat -------------------------------------------------------------------------


@real_data
def test_recipe_seurat_pbmc3k(raw, processed):
    assert processed.shape == (2638, 13714)
    seed = pd.read_csv(SHARED_PBMC3K / "pbmc3k_seed_clusters.csv", index_col="barcode")
    assert processed.obs_names.equals(pd.Index(seed.index))
    counts = processed.layers["counts"]
    assert np.all(np.mod(counts.data, 1) == 0)
    expected = raw[processed.obs_names, processed.var_names].X
    assert (counts != expected).nnz == 0
    assert sp.isspmatrix_csr(processed.X) and processed.X.dtype == np.float32
    np.testing.assert_allclose(np.expm1(processed.X).sum(axis=1).A1, 1e4, rtol=1e-4)
    obs = processed.obs
    assert obs["n_genes_by_counts"].between(201, 2499).all()
    assert (obs["pct_counts_mt"] < 5).all()
    assert processed.var["mt"].sum() == 13
    assert (processed.var["n_cells"] >= 3).all()


@real_data
def test_recipe_seurat_copy_leaves_input(raw, processed):
    assert raw.shape == (2700, 32738)
    assert raw.X.sum() == 6_390_631
    assert list(raw.obs.columns) == [] and list(raw.var.columns) == ["gene_ids"]
    assert "counts" not in raw.layers


def test_recipe_seurat_in_place_and_copy():
    adata = _counts()
    original = adata.copy()
    out = sv.pp.recipe_seurat(adata, min_cells=1, min_genes=5, max_genes=100, copy=True)
    assert (adata.X != original.X).nnz == 0 and "counts" not in adata.layers
    assert adata.shape == original.shape and list(adata.obs.columns) == []
    assert sv.pp.recipe_seurat(adata, min_cells=1, min_genes=5, max_genes=100) is None
    assert 0 < adata.n_obs < original.n_obs  # the 5 % mito cut-off drops some cells
    assert adata.obs_names.equals(out.obs_names) and adata.var_names.equals(out.var_names)
    np.testing.assert_allclose(adata.X.toarray(), out.X.toarray())
    expected = original[adata.obs_names, adata.var_names].X
    assert (adata.layers["counts"] != expected).nnz == 0
    assert adata.uns["recipe_seurat"]["params"]["n_obs_before"] == original.n_obs


def test_recipe_seurat_rejects_non_counts():
    adata = _counts()
    adata.X.data[0] = -1.0
    with pytest.raises(ValueError, match="raw"):
        sv.pp.recipe_seurat(adata)
    assert adata.X.data[0] == -1.0 and "counts" not in adata.layers
    logged = log_adata()
    with pytest.raises(ValueError, match=r"non-integer.*raw"):
        sv.pp.recipe_seurat(logged)
    with pytest.raises(ValueError, match="empty"):
        sv.pp.recipe_seurat(ad.AnnData(np.zeros((0, 5), dtype=np.float32)))
    with pytest.raises(ValueError, match="No cell passes"):
        sv.pp.recipe_seurat(_counts(), min_cells=1, min_genes=1000, max_genes=2000)


# --- seurat_clusters -----------------------------------------------------------------------


@real_data
def test_seurat_clusters_pbmc3k(processed):
    adata = processed.copy()
    X_before = adata.X.copy()
    var_before = adata.var.copy()
    obs_cols, uns_keys = list(adata.obs.columns), set(adata.uns.keys())
    np_state = np.random.get_state()[1].copy()
    sv.pp.seurat_clusters(adata)

    labels = adata.obs["seurat_clusters"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(labels.cat.categories) == [str(i) for i in range(9)]
    sizes = labels.value_counts(sort=False).to_numpy()
    assert np.all(np.diff(sizes) <= 0)
    seed = pd.read_csv(SHARED_PBMC3K / "pbmc3k_seed_clusters.csv", index_col="barcode")
    ari = adjusted_rand_score(seed["seed_cluster"].reindex(adata.obs_names), labels)
    assert ari >= MIN_ARI
    assert adata.uns["seurat_clusters"]["params"]["n_clusters"] == 9

    assert (adata.X != X_before).nnz == 0
    pd.testing.assert_frame_equal(adata.var, var_before)
    assert list(adata.obs.columns) == [*obs_cols, "seurat_clusters"]
    assert set(adata.uns.keys()) == uns_keys | {"seurat_clusters"}
    assert len(adata.obsm) == 0 and len(adata.obsp) == 0 and len(adata.varm) == 0
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)


def test_seurat_clusters_synthetic_key_and_errors():
    adata = log_adata(n_cells=200, n_genes=60)
    sv.pp.seurat_clusters(adata, n_top_genes=40, n_pcs=5, resolution=0.3, key_added="cl")
    assert "cl" in adata.obs and adata.uns["cl"]["params"]["n_top_genes"] == 40
    assert adjusted_rand_score(adata.obs["group"], adata.obs["cl"]) > 0.5
    assert "seurat_clusters" not in adata.obs and "highly_variable" not in adata.var
    with pytest.raises(ValueError, match="recipe_seurat"):
        sv.pp.seurat_clusters(_counts())
    with pytest.raises(ValueError, match="n_pcs"):
        sv.pp.seurat_clusters(adata, n_pcs=100)
