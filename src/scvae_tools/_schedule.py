"""How long to train: the one place where ``epochs="auto"`` is decided.

The write-up trains 2,638 PBMCs for 200 epochs of 256 cells: 2,200 optimizer steps. A fixed
epoch count is wrong at both ends of the range of dataset sizes: a plate of 150 cells gets one
step per epoch (200 steps, too few for a good latent space, and the VAE and VSC suffer most), and
a million cells get 780,000 steps (days on a CPU, far more than the model needs). The rule:

- **At least** :data:`MIN_STEPS` **optimizer steps** (the write-up's 2,200 on PBMC3k): data with
  fewer than 2,560 cells run more than 200 epochs. The deterministic AE gets twice as many
  (its latent type's ``step_factor``): with the linear decoder it converges far more slowly than
  the VAE and VSC, whose KL term fixes the codes' scale (kNN purity of the AE on CellBench
  SORT-seq, means of 3 seeds: 0.30 after 400 steps, 0.83 after 2,200, 0.93 after 4,400, against
  PCA 6's 0.91).
- **Otherwise scVI's heuristic**, ``round(8e6 / n_cells)`` epochs (about 8 million cell visits),
  capped at the write-up's 200: 200 epochs up to 40,000 cells, 8 for a million, exactly scVI's
  number there.

An explicit ``epochs=`` is always obeyed exactly, and so is ``batch_size=``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ._checks import check_int

__all__ = [
    "HELD_OUT_FRACTION",
    "MAX_EPOCHS",
    "MAX_HELD_OUT",
    "MIN_STEPS",
    "Auto",
    "Schedule",
    "auto_epochs",
    "held_out_rows",
    "patience_steps",
    "training_schedule",
]

Auto = Literal["auto"]

#: Epochs of the write-up's configuration; the most the scVI part of the rule chooses.
MAX_EPOCHS = 200
#: Cell visits of scVI's heuristic (``20,000 cells x 400 epochs``): ``epochs = CELL_VISITS / n``.
CELL_VISITS = 8_000_000
#: The fewest optimizer steps ``epochs="auto"`` runs: the write-up's on PBMC3k (200 x 11).
MIN_STEPS = 2_200
#: Share of the cells held out for early stopping (scvi-tools' ``train_size=0.9``) ...
HELD_OUT_FRACTION = 0.1
#: ... and the most cells held out: their loss is computed after every epoch.
MAX_HELD_OUT = 10_000
#: Optimizer steps without a better held-out loss after which early stopping stops, at least.
MIN_PATIENCE = 300


@dataclass(frozen=True)
class Schedule:
    """A training length: what will run, and whether the rule chose the epochs.

    Attributes
    ----------
    epochs
        Passes over all cells.
    batch_size
        Cells per minibatch.
    n_cells
        Cells trained on.
    epochs_auto
        Whether :func:`auto_epochs` chose ``epochs``.
    """

    epochs: int
    batch_size: int
    n_cells: int
    epochs_auto: bool = False

    @property
    def steps_per_epoch(self) -> int:
        """Minibatches per epoch (the last one may be smaller)."""
        return -(-self.n_cells // self.batch_size)

    @property
    def n_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.epochs * self.steps_per_epoch

    def describe(self) -> str:
        """One line for the progress bar, e.g. ``"1100 epochs x 2 batches of 256 (auto)"``."""
        how = " (auto)" if self.epochs_auto else ""
        return f"{self.epochs} epochs x {self.steps_per_epoch} batches of {self.batch_size}{how}"


def auto_epochs(n_cells: int, batch_size: int, step_factor: int = 1) -> int:
    """``max(min(round(8e6 / n_cells), 200), ceil(2200 * step_factor / steps per epoch))``.

    Parameters
    ----------
    n_cells
        Cells to train on.
    batch_size
        Cells per minibatch.
    step_factor
        Multiplies the floor of :data:`MIN_STEPS`: the latent type's ``step_factor`` (2 for
        the deterministic AE, 1 for the others).

    Returns
    -------
    The number of epochs.
    """
    n_cells = max(int(n_cells), 1)
    steps_per_epoch = -(-n_cells // batch_size)
    scvi = min(MAX_EPOCHS, round(CELL_VISITS / n_cells))
    return max(1, scvi, math.ceil(MIN_STEPS * step_factor / steps_per_epoch))


def training_schedule(
    n_cells: int, epochs: int | Auto, batch_size: int, step_factor: int = 1
) -> Schedule:
    """Resolve ``epochs="auto"`` for ``n_cells`` cells; check explicit values.

    Parameters
    ----------
    n_cells
        Cells to train on.
    epochs
        A positive integer, or ``"auto"`` (:func:`auto_epochs`).
    batch_size
        Cells per minibatch, a positive integer.
    step_factor
        Multiplies the ``"auto"`` rule's floor of optimizer steps (:func:`auto_epochs`).

    Returns
    -------
    The schedule that will run.

    Raises
    ------
    TypeError, ValueError
        ``epochs`` is neither ``"auto"`` nor a positive integer, or ``batch_size`` is not a
        positive integer.
    """
    batch_size = check_int("batch_size", batch_size)
    if isinstance(epochs, str) and epochs == "auto":
        n_epochs = auto_epochs(n_cells, batch_size, step_factor)
        return Schedule(n_epochs, batch_size, int(n_cells), True)
    if isinstance(epochs, str):
        raise ValueError(f"`epochs` must be a positive integer or 'auto', got {epochs!r}.")
    return Schedule(check_int("epochs", epochs), batch_size, int(n_cells), False)


def held_out_rows(n_cells: int, random_state: int) -> np.ndarray:
    """The cells held out for early stopping: 10 % (at most 10,000, at least 1), sorted.

    Drawn from their own generator, seeded with ``random_state``: the same ``random_state``
    always holds the same cells out.

    Raises
    ------
    ValueError
        Fewer than 2 cells.
    """
    if n_cells < 2:
        raise ValueError(
            f"Early stopping holds cells out of training, but there are only {n_cells}: pass "
            "early_stopping=False."
        )
    n_held = min(max(1, round(HELD_OUT_FRACTION * n_cells)), MAX_HELD_OUT)
    rng = np.random.default_rng([random_state, 0x5E1D])
    return np.sort(rng.choice(n_cells, n_held, replace=False))


def patience_steps(schedule: Schedule) -> int:
    """Steps without a better held-out loss after which training stops.

    :data:`MIN_PATIENCE`, or a tenth of the scheduled steps when that is more.
    """
    return max(MIN_PATIENCE, schedule.n_steps // 10)
