"""Out-of-core (backed) training, data-parallel training with --nproc, and their bad input."""

import os
import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _synthetic import log_adata
from sklearn.neighbors import NearestNeighbors

import scvae_tools as sv
from scvae_tools import _data
from scvae_tools._data import MinibatchLoader
from scvae_tools.cli import main

FAST = {"epochs": 4, "batch_size": 64, "progress": False}


def _knn_purity(x, labels, k=10):
    idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    return float((labels[idx] == labels[:, None]).mean())


@pytest.fixture
def small_geometry(monkeypatch):
    """Blocks of 16 rows and windows of 128 cells, so a small file takes many windows."""
    monkeypatch.setattr(_data, "SHUFFLE_BLOCK_ROWS", 16)
    monkeypatch.setattr(_data, "window_rows", lambda values_per_row, batch_size: 128)


@pytest.fixture
def rows_read(monkeypatch):
    """Every set of rows the out-of-core reader reads from disk."""
    reads = []
    original = _data._RowReader.read

    def spy(self, rows):
        reads.append(np.array(rows))
        return original(self, rows)

    monkeypatch.setattr(_data._RowReader, "read", spy)
    return reads


def _sorted_by_group(n_cells=1200):
    adata = log_adata(n_cells=n_cells)
    # Sorted by group: every block on disk holds one group, the hard case for block shuffling.
    adata = adata[np.argsort(adata.obs["group"].to_numpy(), kind="stable")].copy()
    del adata.layers["counts"]
    return adata


def test_backed_training_reads_blocks_and_matches_in_memory_quality(
    tmp_path, small_geometry, rows_read
):
    adata = _sorted_by_group()
    path = tmp_path / "sorted.h5ad"
    adata.write_h5ad(path)
    labels = adata.obs["group"].to_numpy()
    sv.tl.vae(adata, **FAST)
    backed = ad.read_h5ad(path, backed="r")
    sv.tl.vae(backed, **FAST)

    # Read window by window, never the whole matrix at once, and in blocks of contiguous rows.
    assert len(rows_read) > 4 * FAST["epochs"]
    assert max(len(r) for r in rows_read) <= 128
    first_epoch = rows_read[: 1200 // 128 + 1]
    assert np.mean([np.sum(np.diff(r) == 1) / len(r) for r in first_epoch]) > 0.8
    assert backed.uns["vae"]["params"]["backed"]
    mem, out = adata.obsm["X_vae"], backed.obsm["X_vae"]
    assert out.shape == mem.shape and not np.array_equal(out, mem)  # block-shuffled: not equal
    assert _knn_purity(out, labels) >= _knn_purity(mem, labels) - 0.05
    assert _knn_purity(out, labels) > 0.9

    # Same random_state, same result.
    again = ad.read_h5ad(path, backed="r")
    sv.tl.vae(again, **FAST)
    np.testing.assert_array_equal(again.obsm["X_vae"], out)
    backed.file.close()
    again.file.close()


def test_backed_call_reads_each_cell_once_per_epoch_to_encode_and_to_scale_the_decoder(
    tmp_path, small_geometry, rows_read
):
    adata = _sorted_by_group(600)
    path = tmp_path / "data.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    sv.tl.ae(backed, **{**FAST, "epochs": 2})
    # No pass of its own to look for NaN: two epochs and the encoding read each cell once each,
    # the linear decoder's initial scale reads each once more (at most 10,000 cells), and the
    # linear path's principal axes once more (at most 4,000 cells).
    counts = np.bincount(np.concatenate(rows_read), minlength=adata.n_obs)
    np.testing.assert_array_equal(counts, np.full(adata.n_obs, 5))
    rows_read.clear()
    sv.tl.ae(backed, decoder="mlp", linear_path=False, **{**FAST, "epochs": 2})
    counts = np.bincount(np.concatenate(rows_read), minlength=adata.n_obs)
    np.testing.assert_array_equal(counts, np.full(adata.n_obs, 3))
    backed.file.close()


def test_backed_nan_is_found_while_training_and_nothing_is_written(tmp_path):
    # Past the first 8,192 rows, which are checked before training starts.
    X = np.random.default_rng(0).random((9000, 8), dtype=np.float32)
    X[8500, 3] = np.nan
    ad.AnnData(sp.csr_matrix(X)).write_h5ad(tmp_path / "nan.h5ad")
    backed = ad.read_h5ad(tmp_path / "nan.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"NaN or infinite.*rows .*reading it from disk"):
        sv.tl.vae(backed, epochs=1, batch_size=512, progress=False)
    assert "X_vae" not in backed.obsm and "vae" not in backed.uns
    backed.file.close()


def test_backed_csc_is_refused_with_the_fix(tmp_path):
    adata = log_adata()
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    backed = ad.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"CSC.*needs CSR.*tocsr"):
        sv.tl.ae(backed, **FAST)
    assert "X_ae" not in backed.obsm
    backed.file.close()


def test_backed_dense_trains_out_of_core(tmp_path, rows_read):
    adata = log_adata(sparse=False)
    del adata.layers["counts"]
    adata.write_h5ad(tmp_path / "dense.h5ad")
    backed = ad.read_h5ad(tmp_path / "dense.h5ad", backed="r")
    sv.tl.ae(backed, **FAST)
    sv.tl.ae(adata, **FAST)
    assert rows_read  # read by the out-of-core reader
    # One window holds all 240 cells: shuffled exactly as in memory.
    np.testing.assert_allclose(backed.obsm["X_ae"], adata.obsm["X_ae"], rtol=1e-4, atol=1e-5)
    backed.file.close()


@pytest.mark.parametrize("backed", [False, True])
def test_shards_cover_every_cell_with_equal_steps(tmp_path, small_geometry, backed):
    n_cells, world = 301, 3
    X = np.zeros((n_cells, 4), dtype=np.float32)
    X[:, 0] = np.arange(n_cells)  # each row says which cell it is
    if backed:
        ad.AnnData(X).write_h5ad(tmp_path / "ids.h5ad")
        X = ad.read_h5ad(tmp_path / "ids.h5ad", backed="r").X
    seen, steps = [], []
    for rank in range(world):
        loader = MinibatchLoader(X, 32, rank=rank, world_size=world)
        batches = list(loader.epoch(np.random.default_rng(7)))
        steps.append(len(batches))
        seen.append(np.concatenate([b.dense[:, 0].numpy() for b in batches]).astype(int))
    assert len(set(steps)) == 1 and steps[0] == len(loader)
    assert {len(s) for s in seen} == {101}  # ceil(301 / 3), the last shard padded
    everything = np.concatenate(seen)
    assert set(everything) == set(range(n_cells))
    assert len(everything) - len(set(everything)) == 2  # the two padding cells


def test_more_processes_than_cells_is_refused():
    with pytest.raises(ValueError, match="at most as many"):
        MinibatchLoader(np.ones((3, 2), dtype=np.float32), 2, rank=0, world_size=4)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_cli_backed_writes_a_copy_with_the_latent(tmp_path, capsys):
    adata = log_adata()
    adata.write_h5ad(tmp_path / "in.h5ad")
    args = ["train", "vsc", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad")]
    assert main([*args, "--backed", "--epochs", "2", "--quiet", "--batch-size", "64"]) == 0
    assert "(backed)" in capsys.readouterr().out
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_vsc"].shape == (adata.n_obs, 6) and "X_vsc_spike" in out.obsm
    assert out.uns["vsc"]["params"]["backed"]
    assert (out.X != adata.X).nnz == 0 and (out.layers["counts"] != adata.layers["counts"]).nnz == 0
    assert (out.obs_names == adata.obs_names).all()
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("setup", "extra", "match"),
    [
        ("missing", [], "does not exist"),
        ("csc", ["--backed"], "CSC"),
        ("tiny", ["--nproc", "4"], r"--nproc 4 is more than the 3 cells"),
        ("ok", ["--nproc", "0"], "--nproc must be >= 1"),
    ],
)
def test_cli_bad_input_names_the_problem_and_writes_nothing(tmp_path, capsys, setup, extra, match):
    adata = log_adata()
    if setup == "csc":
        adata.X = sp.csc_matrix(adata.X)
    if setup == "tiny":
        adata = adata[:3].copy()
    path = tmp_path / "in.h5ad"
    if setup != "missing":
        adata.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    assert main(["train", "ae", str(path), "-o", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert "scvae-tools: error:" in err
    assert re.search(match, err), err
    assert not out.exists()


def test_cli_two_processes_gloo(tmp_path):
    """``scvae-tools train --nproc 2``: two processes (gloo), as a user starts it."""
    adata = log_adata(n_cells=401)  # odd: the second shard is padded
    adata.write_h5ad(tmp_path / "in.h5ad")
    out, model_path = tmp_path / "out.h5ad", tmp_path / "model.pt"
    cmd = [sys.executable, "-m", "scvae_tools.cli", "train", "vae", str(tmp_path / "in.h5ad")]
    cmd += ["-o", str(out), "--nproc", "2", "--epochs", "6", "--batch-size", "64", "--quiet"]
    cmd += ["--device", "cpu", "--save-model", str(model_path), "--early-stopping"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with 2 processes" in proc.stdout

    result = ad.read_h5ad(out)
    assert (result.obs_names == adata.obs_names).all()
    params = result.uns["vae"]["params"]
    assert params["n_processes"] == 2 and params["batch_size"] == 64
    loss = result.uns["vae"]["history"]["loss"]
    assert len(loss) == 6 and loss[-1] < loss[0]
    # Early stopping in both processes: the same 40 held-out cells, the best epoch's weights
    # kept (the saved model's, checked below), 361 cells trained on in 6 steps per epoch.
    held = result.uns["vae"]["history"]["held_out_loss"]
    assert params["n_held_out"] == 40 and len(held) == 6 and not params["stopped_early"]
    assert params["best_epoch"] == int(np.argmin(held)) + 1
    assert params["best_step"] == 6 * params["best_epoch"] and params["n_steps"] == 36
    # Every cell's latent, in the input's order: the saved model encodes each cell to its row.
    rep = result.obsm["X_vae"]
    assert rep.shape == (adata.n_obs, 6) and np.isfinite(rep).all()
    model = sv.models.load(model_path)
    np.testing.assert_allclose(model.encode(adata), rep, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_backed_training_on_cuda(tmp_path, small_geometry):
    adata = _sorted_by_group()
    adata.write_h5ad(tmp_path / "data.h5ad")
    backed = ad.read_h5ad(tmp_path / "data.h5ad", backed="r")
    sv.tl.vae(backed, device="cuda", **FAST)
    labels = adata.obs["group"].to_numpy()
    assert backed.uns["vae"]["params"]["device"].startswith("cuda")
    assert _knn_purity(backed.obsm["X_vae"], labels) > 0.9
    backed.file.close()
