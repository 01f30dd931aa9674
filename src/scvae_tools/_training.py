"""The one training loop shared by all three models."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ._data import MinibatchLoader
from .models._module import AutoencoderModule

__all__ = ["TrainingDivergedError", "TrainingResult", "train"]


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite during training."""


@dataclass
class TrainingResult:
    """Per-epoch history of each loss term, and the wall time of training."""

    history: dict[str, np.ndarray]
    seconds: float


def train(
    module: AutoencoderModule,
    loader: MinibatchLoader,
    *,
    epochs: int,
    lr: float,
    random_state: int,
    progress: bool = True,
    description: str = "training",
) -> TrainingResult:
    """Fit ``module`` with Adam, one pass over ``loader`` per epoch.

    Randomness (minibatch order, latent samples) comes from generators seeded with
    ``random_state``; the global NumPy and torch states are neither used nor changed.

    Raises
    ------
    TrainingDivergedError
        When an epoch's mean loss is not finite; names the epoch and suggests a lower ``lr``.
    """
    device = loader.device
    rng = np.random.default_rng(random_state)
    generator = torch.Generator(device=device)
    generator.manual_seed(random_state)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, fused=True)
    module.train()

    names: list[str] | None = None
    history: list[list[float]] = []
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=description, unit="epoch", disable=not progress, leave=True)
    for epoch in bar:
        module.set_progress(epoch / max(epochs - 1, 1))
        totals: torch.Tensor | None = None
        for batch in loader.epoch(rng):
            terms = module.loss(batch, generator)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            weighted = torch.stack([t.detach() for t in terms.values()]) * batch.n_cells
            totals = weighted if totals is None else totals + weighted
            names = names or list(terms)
        # One host sync per epoch, not per batch.
        means = (totals / loader.n_cells).tolist()
        if not np.all(np.isfinite(means)):
            raise TrainingDivergedError(
                f"Training diverged: the loss became {means[0]} in epoch {epoch + 1} of {epochs}. "
                f"Try a lower learning rate (lr={lr:g} now, e.g. lr={lr / 10:g}), or check the "
                "input's scale."
            )
        history.append(means)
        bar.set_postfix(loss=f"{means[0]:.4g}", refresh=False)
    seconds = time.perf_counter() - start
    values = np.asarray(history, dtype=np.float64).reshape(len(history), -1)
    return TrainingResult({n: values[:, i] for i, n in enumerate(names or [])}, seconds)
