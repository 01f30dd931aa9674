"""Training length: epochs="auto" follows the data; explicit epochs and batch_size rule."""

import numpy as np
import pytest
from _synthetic import log_adata

import scvae_tools as sv
from scvae_tools import _data, _schedule
from scvae_tools._schedule import MIN_STEPS, auto_epochs, training_schedule
from scvae_tools.models._module import LATENT_TYPES


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
    sv.tl.vae(adata, hidden=(8,), progress=False)
    params = adata.uns["vae"]["params"]
    assert params["epochs_auto"] and params["batch_size"] == 256
    assert params["epochs"] == 30 == params["n_steps"] == len(sizes)  # not MAX_EPOCHS
    assert sizes == [40] * 30
    assert len(adata.uns["vae"]["history"]["loss"]) == 30


def test_the_ae_trains_longer_by_its_step_factor(monkeypatch):
    monkeypatch.setattr(_schedule, "MIN_STEPS", 30)
    monkeypatch.setattr(_schedule, "MAX_EPOCHS", 5)
    factor = LATENT_TYPES["deterministic"].step_factor
    assert factor > 1 and LATENT_TYPES["gaussian"].step_factor == 1
    assert LATENT_TYPES["spike_slab"].step_factor == 1
    steps = {}
    for tool in ("ae", "vae", "vsc"):
        adata = log_adata(n_cells=40, n_genes=20)
        getattr(sv.tl, tool)(adata, hidden=(8,), progress=False)
        steps[tool] = adata.uns[tool]["params"]["n_steps"]
    assert steps == {"ae": 30 * factor, "vae": 30, "vsc": 30}
    # An explicit length is obeyed by the AE too.
    adata = log_adata(n_cells=40, n_genes=20)
    sv.tl.ae(adata, hidden=(8,), epochs=7, progress=False)
    assert adata.uns["ae"]["params"]["n_steps"] == 7


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
    factor = LATENT_TYPES["deterministic"].step_factor  # the AE's floor: 20 x factor steps
    assert f"{10 * factor} epochs of batches of 25" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--epochs", "lots"])
    assert "integer or 'auto'" in capsys.readouterr().err


def _plateau_call(adata, monkeypatch, **options):
    """A VAE trained far past its best, with a short patience, so that it stops on a plateau."""
    monkeypatch.setattr(_schedule, "MIN_PATIENCE", 40)
    return sv.tl.vae(
        adata,
        hidden=(16, 8),
        epochs=150,
        batch_size=32,
        lr=3e-3,
        early_stopping=True,
        progress=False,
        return_model=True,
        # The write-up's deep decoder overfits such a small set quickly: a plateau to stop on.
        **{"decoder": "mlp", **options},
    )


def test_early_stopping_stops_on_a_plateau_and_restores_the_best_weights(monkeypatch):
    from scvae_tools._training import held_out_loss

    adata = log_adata(n_cells=120, n_genes=30)
    model = _plateau_call(adata, monkeypatch)
    params, history = adata.uns["vae"]["params"], adata.uns["vae"]["history"]
    held = history["held_out_loss"]
    assert params["early_stopping"] and params["stopped_early"]
    assert params["max_epochs"] == 150 > params["epochs"] == len(held) == len(history["loss"])
    # A tenth of the 150 x 4 scheduled steps is more than the (patched) least patience of 40.
    assert params["n_held_out"] == 12 and params["patience_steps"] == 60
    # Stopped exactly one patience after the best epoch, whose weights are the model's.
    steps_per_epoch = -(-108 // 32)
    assert params["best_step"] == params["best_epoch"] * steps_per_epoch
    assert params["best_epoch"] == int(np.argmin(held)) + 1
    since_best = params["n_steps"] - params["best_step"]
    assert since_best >= 60 > since_best - steps_per_epoch
    loader = _data.MinibatchLoader(adata.X, 32, held_out=_schedule.held_out_rows(adata.n_obs, 0))
    assert held_out_loss(model.module, loader.held_out_batches()) == pytest.approx(held.min())
    np.testing.assert_allclose(model.encode(adata), adata.obsm["X_vae"], rtol=1e-6, atol=1e-6)
    # The final epoch's weights were worse on the held-out cells than the restored ones.
    assert held[-1] > held.min()


def test_early_stopping_same_random_state_same_split_and_result(monkeypatch):
    a, b, c = (log_adata(n_cells=120, n_genes=30) for _ in range(3))
    _plateau_call(a, monkeypatch, random_state=5)
    _plateau_call(b, monkeypatch, random_state=5)
    _plateau_call(c, monkeypatch, random_state=6)
    np.testing.assert_array_equal(a.obsm["X_vae"], b.obsm["X_vae"])
    np.testing.assert_array_equal(
        a.uns["vae"]["history"]["held_out_loss"], b.uns["vae"]["history"]["held_out_loss"]
    )
    assert not np.array_equal(a.obsm["X_vae"], c.obsm["X_vae"])
    rows = _schedule.held_out_rows(120, 5)
    np.testing.assert_array_equal(rows, _schedule.held_out_rows(120, 5))
    assert not np.array_equal(rows, _schedule.held_out_rows(120, 6))
    assert len(rows) == len(np.unique(rows)) == 12


@pytest.mark.parametrize("backed", [False, True])
def test_held_out_cells_are_never_trained_on(tmp_path, backed):
    import anndata as ad

    adata = log_adata(n_cells=1_100, n_genes=20)
    X = adata.X
    if backed:
        adata.write_h5ad(tmp_path / "a.h5ad")
        X = ad.read_h5ad(tmp_path / "a.h5ad", backed="r").X
    held = _schedule.held_out_rows(adata.n_obs, 0)
    loader = _data.MinibatchLoader(X, 64, held_out=held)
    if backed:  # small windows, so that the block shuffle of backed data is what runs
        loader.window_rows = 128
    order = loader._order(np.random.default_rng(0))
    assert len(order) == loader.n_train == 1_100 - 110
    assert not np.isin(order, held).any() and len(np.unique(order)) == len(order)
    batches = loader.held_out_batches()
    assert sum(b.n_cells for b in batches) == 110
    assert sum(b.n_cells for b in loader.epoch(np.random.default_rng(0))) == 990


def test_early_stopping_on_too_few_cells_is_a_clear_error():
    adata = log_adata(n_cells=1, n_genes=10)
    with pytest.raises(ValueError, match=r"only 1: pass early_stopping=False"):
        sv.tl.ae(adata, early_stopping=True, progress=False)
    assert "ae" not in adata.uns


def test_cli_early_stopping(tmp_path, capsys, monkeypatch):
    import anndata as ad

    from scvae_tools.cli import main

    monkeypatch.setattr(_schedule, "MIN_PATIENCE", 10)
    log_adata(n_cells=80, n_genes=20).write_h5ad(tmp_path / "in.h5ad")
    args = ["train", "vae", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad")]
    common = ["--epochs", "300", "--batch-size", "24", "--lr", "0.01", "--hidden", "8", "--quiet"]
    assert main([*args, *common, "--early-stopping"]) == 0
    params = ad.read_h5ad(tmp_path / "out.h5ad").uns["vae"]["params"]
    assert params["early_stopping"] and params["stopped_early"] and params["n_held_out"] == 8
    out = capsys.readouterr().out
    assert f"stopped early at step {params['n_steps']}" in out
    assert f"weights of step {params['best_step']} restored" in out
