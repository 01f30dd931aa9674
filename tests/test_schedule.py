"""Training length: epochs="auto" follows the data; explicit epochs and batch_size rule."""

import numpy as np
import pytest
from _synthetic import log_adata

import scvae_tools as sv
from scvae_tools import _data, _schedule
from scvae_tools._schedule import MIN_STEPS, auto_epochs, training_schedule


def _count_minibatches(monkeypatch):
    """Record the size of every minibatch the tools train on."""
    sizes: list[int] = []
    original = _data.MinibatchLoader.epoch

    def counting(self, rng):
        for batch in original(self, rng):
            sizes.append(batch.n_cells)
            yield batch

    monkeypatch.setattr(_data.MinibatchLoader, "epoch", counting)
    return sizes


@pytest.mark.parametrize(
    ("n_cells", "epochs"),
    [
        (150, 2_200),  # a plate: one full batch per epoch, so 2,200 epochs
        (340, 1_100),
        (700, 734),
        (2_638, 200),  # PBMC3k: exactly the write-up's configuration
        (10_000, 200),
        (100_000, 80),  # scVI's heuristic from 40,000 cells on
        (1_000_000, 8),
        (50_000_000, 1),
    ],
)
def test_auto_rule(n_cells, epochs):
    schedule = training_schedule(n_cells, "auto", 256)
    assert schedule.epochs == epochs and schedule.epochs_auto
    assert schedule.n_steps >= MIN_STEPS
    if n_cells >= 40_000:  # scVI's rule, min(round(20000 / n * 400), 400), where below 200
        assert schedule.epochs == max(1, round(20_000 / n_cells * 400))


def test_auto_epochs_follow_the_batch_size():
    assert auto_epochs(300, 256) == 1_100 and auto_epochs(300, 32) == 220
    assert auto_epochs(2_638, 64) == 200  # 42 steps per epoch: the scVI part rules


def test_tiny_data_default_call_runs_more_epochs(monkeypatch):
    # The rule with smaller constants, so that the test is quick; the real ones are checked in
    # test_auto_rule.
    monkeypatch.setattr(_schedule, "MIN_STEPS", 30)
    monkeypatch.setattr(_schedule, "MAX_EPOCHS", 5)
    adata = log_adata(n_cells=40, n_genes=20)  # fewer cells than a batch of 256
    sizes = _count_minibatches(monkeypatch)
    sv.tl.ae(adata, hidden=(8,), progress=False)
    params = adata.uns["ae"]["params"]
    assert params["epochs_auto"] and params["batch_size"] == 256
    assert params["epochs"] == 30 == params["n_steps"] == len(sizes)  # not MAX_EPOCHS
    assert sizes == [40] * 30
    assert len(adata.uns["ae"]["history"]["loss"]) == 30


@pytest.mark.parametrize(("epochs", "batch_size"), [(7, 13), (3, 500), (1, 1)])
def test_explicit_epochs_and_batch_size_are_obeyed(monkeypatch, epochs, batch_size):
    adata = log_adata(n_cells=40, n_genes=20)
    sizes = _count_minibatches(monkeypatch)
    sv.tl.vae(adata, epochs=epochs, batch_size=batch_size, progress=False)
    params = adata.uns["vae"]["params"]
    assert (params["epochs"], params["batch_size"]) == (epochs, batch_size)
    assert not params["epochs_auto"]
    per_epoch = [min(batch_size, 40 - start) for start in range(0, 40, batch_size)]
    assert sizes == per_epoch * epochs
    assert params["n_steps"] == len(sizes)
    assert len(adata.uns["vae"]["history"]["loss"]) == epochs


def test_progress_bar_shows_the_chosen_length(capfd):
    adata = log_adata(n_cells=60, n_genes=20)
    sv.tl.ae(adata, epochs=2, batch_size=16, progress=True)
    assert "2 epochs x 4 batches of 16" in capfd.readouterr().err
    assert training_schedule(60, "auto", 16).describe() == "550 epochs x 4 batches of 16 (auto)"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"epochs": "automatic"}, ValueError),
        ({"epochs": 2.5}, TypeError),
        ({"epochs": 0}, ValueError),
        ({"epochs": None}, TypeError),
        ({"batch_size": "auto"}, TypeError),
        ({"batch_size": 0}, ValueError),
    ],
)
def test_bad_training_length_is_a_clear_error(options, error):
    adata = log_adata(n_cells=40, n_genes=20)
    with pytest.raises(error, match=next(iter(options))):
        sv.tl.ae(adata, progress=False, **options)
    assert "ae" not in adata.uns and "X_ae" not in adata.obsm


def test_same_random_state_same_result_with_several_steps_per_epoch():
    a, b = log_adata(n_cells=40, n_genes=20), log_adata(n_cells=40, n_genes=20)
    sv.tl.vsc(a, epochs=5, batch_size=16, progress=False, random_state=3)
    sv.tl.vsc(b, epochs=5, batch_size=16, progress=False, random_state=3)
    np.testing.assert_array_equal(a.obsm["X_vsc"], b.obsm["X_vsc"])


def test_cli_epochs_auto_and_bad_value(tmp_path, capsys, monkeypatch):
    from scvae_tools.cli import main

    monkeypatch.setattr(_schedule, "MIN_STEPS", 20)
    monkeypatch.setattr(_schedule, "MAX_EPOCHS", 5)
    adata = log_adata(n_cells=50, n_genes=20)
    adata.write_h5ad(tmp_path / "in.h5ad")
    args = ["train", "ae", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad")]
    assert main([*args, "--epochs", "auto", "--batch-size", "25", "--hidden", "8", "--quiet"]) == 0
    assert "10 epochs of batches of 25" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--epochs", "lots"])
    assert "integer or 'auto'" in capsys.readouterr().err
