"""How long to train: the one place where ``epochs="auto"`` is decided.

The write-up trains 2,638 PBMCs for 200 epochs of 256 cells: 2,200 optimizer steps. A fixed
epoch count is wrong at both ends of the range of dataset sizes: a plate of 150 cells gets one
step per epoch (200 steps, too few for a good latent space, and the VAE and VSC suffer most), and
a million cells get 780,000 steps (days on a CPU, far more than the model needs). The rule:

- **At least** :data:`MIN_STEPS` **optimizer steps** (the write-up's 2,200 on PBMC3k): data with
  fewer than 2,560 cells run more than 200 epochs.
- **Otherwise scVI's heuristic**, ``round(8e6 / n_cells)`` epochs (about 8 million cell visits),
  capped at the write-up's 200: 200 epochs up to 40,000 cells, 8 for a million, exactly scVI's
  number there.

An explicit ``epochs=`` is always obeyed exactly, and so is ``batch_size=``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ._checks import check_int

__all__ = ["MAX_EPOCHS", "MIN_STEPS", "Auto", "Schedule", "auto_epochs", "training_schedule"]

Auto = Literal["auto"]

#: Epochs of the write-up's configuration; the most the scVI part of the rule chooses.
MAX_EPOCHS = 200
#: Cell visits of scVI's heuristic (``20,000 cells x 400 epochs``): ``epochs = CELL_VISITS / n``.
CELL_VISITS = 8_000_000
#: The fewest optimizer steps ``epochs="auto"`` runs: the write-up's on PBMC3k (200 x 11).
MIN_STEPS = 2_200


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


def auto_epochs(n_cells: int, batch_size: int) -> int:
    """``max(min(round(8e6 / n_cells), 200), ceil(2200 / steps per epoch))``.

    Parameters
    ----------
    n_cells
        Cells to train on.
    batch_size
        Cells per minibatch.

    Returns
    -------
    The number of epochs.
    """
    n_cells = max(int(n_cells), 1)
    steps_per_epoch = -(-n_cells // batch_size)
    scvi = min(MAX_EPOCHS, round(CELL_VISITS / n_cells))
    return max(1, scvi, math.ceil(MIN_STEPS / steps_per_epoch))


def training_schedule(n_cells: int, epochs: int | Auto, batch_size: int) -> Schedule:
    """Resolve ``epochs="auto"`` for ``n_cells`` cells; check explicit values.

    Parameters
    ----------
    n_cells
        Cells to train on.
    epochs
        A positive integer, or ``"auto"`` (:func:`auto_epochs`).
    batch_size
        Cells per minibatch, a positive integer.

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
        return Schedule(auto_epochs(n_cells, batch_size), batch_size, int(n_cells), True)
    if isinstance(epochs, str):
        raise ValueError(f"`epochs` must be a positive integer or 'auto', got {epochs!r}.")
    return Schedule(check_int("epochs", epochs), batch_size, int(n_cells), False)
