"""The one training loop shared by all three models, in one process or data-parallel.

Data-parallel training is torch's own: when this process belongs to a ``torch.distributed``
process group (started by ``scvae-tools train --nproc N`` or by ``torchrun``), the loop wraps the
module in ``DistributedDataParallel``, each process trains on its shard of every epoch
(:class:`~scvae_tools._data.MinibatchLoader`) and gradients are averaged across processes at
every step.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ._data import MinibatchLoader
from .models._module import AutoencoderModule

__all__ = [
    "PRECISIONS",
    "EarlyStopping",
    "Precision",
    "TrainingDivergedError",
    "TrainingResult",
    "gather_rows",
    "held_out_loss",
    "process_group",
    "train",
]

Precision = Literal["float32", "bfloat16"]
#: Type of the output layer's products for each ``precision`` (None: the weights' float32).
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite during training."""


@dataclass
class TrainingResult:
    """Per-epoch history of each loss term, the wall time, and where early stopping stopped.

    ``history`` has one value per epoch run of each loss term (and of ``"held_out_loss"`` with
    early stopping). ``epochs`` and ``steps`` are what ran; ``best_epoch`` and ``best_step``
    (1-based) are where the restored weights come from, None without early stopping.
    """

    history: dict[str, np.ndarray]
    seconds: float
    epochs: int = 0
    steps: int = 0
    best_epoch: int | None = None
    best_step: int | None = None


@dataclass(frozen=True)
class EarlyStopping:
    """When to stop: the held-out loss has not improved for ``patience`` optimizer steps.

    Attributes
    ----------
    patience
        Optimizer steps without a new best held-out loss after which training stops (checked
        at the end of each epoch).
    min_delta
        Relative improvement of the held-out loss that counts as a new best.
    """

    patience: int
    min_delta: float = 0.0


@torch.no_grad()
def held_out_loss(module: AutoencoderModule, batches: list[Any]) -> float:
    """Mean over the held-out cells of ``reconstruction + beta * kl``, in evaluation mode.

    The full ``beta`` is used even during a KL warm-up, so that the values of all epochs are
    comparable; the latent code is the posterior mean (no sampling), so the value depends on the
    weights alone.
    """
    was_training = module.training
    module.eval()
    try:
        total, cells = 0.0, 0
        for batch in batches:
            terms = module.loss(batch)
            loss = terms["reconstruction"] + module.beta * terms.get("kl", 0.0)
            total += float(loss) * batch.n_cells
            cells += batch.n_cells
        return total / max(cells, 1)
    finally:
        module.train(was_training)


def process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of this process's ``torch.distributed`` group; ``(0, 1)`` if none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(local: np.ndarray, n_total: int, device: torch.device) -> np.ndarray:
    """Every process's ``local`` rows, concatenated in rank order, on every process.

    Process ``r`` holds rows ``r * s`` to ``(r + 1) * s`` of ``n_total`` (``s`` rows each, the
    last process fewer); the result has ``n_total`` rows. One ``all_gather`` of padded tensors.
    """
    _, world = process_group()
    if world == 1:
        return local
    shard = -(-n_total // world)
    padded = torch.zeros((shard, *local.shape[1:]), dtype=torch.float32, device=device)
    padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local)).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n_total].cpu().numpy()


def _rank_seed(random_state: int, rank: int) -> int:
    """Seed of the latent samples of process ``rank``: ``random_state`` itself for rank 0."""
    if rank == 0:
        return random_state
    return int(np.random.SeedSequence([random_state, rank]).generate_state(1, np.uint64)[0] >> 1)


class _Objective(nn.Module):
    """The module's loss as ``forward``, the call that DistributedDataParallel hooks into."""

    def __init__(self, module: AutoencoderModule):
        super().__init__()
        self.module = module

    def forward(
        self, batch: Any, generator: torch.Generator, dtype: torch.dtype | None
    ) -> dict[str, torch.Tensor]:
        return self.module.loss(batch, generator, dtype)


# glibc's mallopt parameters (malloc.h), and the values its dynamic threshold settles at for
# programs that allocate large blocks (the mmap threshold grows up to 32 MiB, trim is twice it).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_SETTLED_MMAP, _SETTLED_TRIM = 32 << 20, 64 << 20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - musl or an unusual libc
        return None


@contextlib.contextmanager
def reuse_freed_memory(max_block: int = 64 << 20) -> Iterator[None]:
    """Keep freed blocks of up to ``max_block`` bytes in the heap while training.

    Each step allocates and frees the same few multi-megabyte tensors (gradients of the
    ``n_genes``-wide layers, the Gram products). glibc serves such blocks with ``mmap`` and
    hands them back on ``free``, so every step page-faults them in again: 10-15 % of a step on
    PBMC3k. Raising the thresholds keeps them in the heap. Afterwards the heap is trimmed and
    the thresholds are left where glibc's own dynamic threshold settles for large blocks (any
    ``mallopt`` call ends the dynamic adjustment, and glibc's small start values would make
    later large allocations of the process page-fault every time). A no-op off glibc.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, max_block)
    libc.mallopt(_M_TRIM_THRESHOLD, 8 * max_block)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP)
        libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM)
        libc.malloc_trim(0)


#: Adam's moment estimates below this are set to zero every ``_SWEEP_STEPS`` steps.
_NEGLIGIBLE_MOMENT = 1e-30
_SWEEP_STEPS = 64


@torch.no_grad()
def zero_negligible_moments(optimizer: torch.optim.Optimizer) -> None:
    """Set Adam's moment estimates that are too small to move a weight to exactly zero.

    A weight whose gradient stays zero (an output weight of a hidden unit that a ReLU has
    switched off) keeps a first moment that decays by 0.9 per step. After some 800 steps it
    becomes a subnormal float, which the CPU computes with tens of times slower than with normal
    ones, and it stays subnormal for about 150 more steps. On a million cells, steps took 45 %
    longer from about step 800 on, and the epoch 30 % longer (see the Scaling page). Flushing
    subnormals to zero in the CPU would need every worker thread of torch's pool; zeroing them
    here is thread-independent. Below ``1e-30`` a moment moves a weight by less than
    ``lr * 1e-22`` per step (Adam divides by at least ``eps = 1e-8``), so no result changes
    beyond float rounding.
    """
    for state in optimizer.state.values():
        for name in ("exp_avg", "exp_avg_sq"):
            moment = state.get(name)
            if moment is not None and moment.is_floating_point():
                moment.masked_fill_(moment.abs() < _NEGLIGIBLE_MOMENT, 0.0)


def train(
    module: AutoencoderModule,
    loader: MinibatchLoader,
    *,
    epochs: int,
    lr: float,
    random_state: int,
    precision: Precision = "float32",
    progress: bool = True,
    description: str = "training",
    early_stopping: EarlyStopping | None = None,
) -> TrainingResult:
    """Fit ``module`` with Adam, one pass over ``loader`` per epoch.

    Randomness (minibatch order, latent samples) comes from generators seeded with
    ``random_state``; the global NumPy and torch states are neither used nor changed.

    ``precision="bfloat16"`` computes the output layer's products (with the minibatch and its
    Gram matrix) and their gradients in bfloat16
    (:func:`~scvae_tools.models.AutoencoderModule.reconstruction_loss`); all else stays float32.

    When ``loader`` is one of several data-parallel processes (``loader.world_size > 1``, a
    ``torch.distributed`` group initialised), the module is wrapped in
    ``DistributedDataParallel``: every process draws the same epoch order and trains on its
    shard of it, all run the same number of steps, and the history is the mean over all
    processes' cells. Latent samples use a generator per process (rank 0's is seeded with
    ``random_state`` itself).

    With ``early_stopping``, the loss of ``loader``'s held-out cells
    (:meth:`~scvae_tools._data.MinibatchLoader.held_out_batches`, :func:`held_out_loss`) is
    computed after every epoch and recorded as ``history["held_out_loss"]``; training stops once
    it has not improved for ``early_stopping.patience`` steps, and the weights of its best epoch
    are restored. Every process computes the same value from the same weights.

    Raises
    ------
    TrainingDivergedError
        When an epoch's mean loss is not finite; names the epoch and suggests a lower ``lr``.
    """
    device = loader.device
    dtype = PRECISIONS[precision]
    rng = np.random.default_rng(random_state)
    generator = torch.Generator(device=device)
    generator.manual_seed(_rank_seed(random_state, loader.rank))
    # Only what may train: architecture surgery freezes the reference's weights.
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr, fused=True)
    module.train()
    objective = module.loss
    if loader.world_size > 1:
        gpus = None
        if device.type == "cuda":
            gpus = [device.index if device.index is not None else torch.cuda.current_device()]
        objective = DistributedDataParallel(_Objective(module), device_ids=gpus)
    cells_per_epoch = loader.shard_size * loader.world_size

    names: list[str] | None = None
    history: list[list[float]] = []
    held_out = loader.held_out_batches() if early_stopping is not None else []
    if early_stopping is not None and not held_out:
        raise ValueError("Early stopping needs held-out cells: pass `held_out` to the loader.")
    held_history: list[float] = []
    best: tuple[float, int, int, dict[str, torch.Tensor]] | None = None
    start = time.perf_counter()
    quiet = not progress or loader.rank > 0
    bar = tqdm(range(epochs), desc=description, unit="epoch", disable=quiet, leave=True)
    step = 0
    with reuse_freed_memory():
        for epoch in bar:
            module.set_progress(epoch / max(epochs - 1, 1))
            totals: torch.Tensor | None = None
            for batch in loader.epoch(rng):
                terms = objective(batch, generator, dtype)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimizer.step()
                step += 1
                if step % _SWEEP_STEPS == 0:
                    zero_negligible_moments(optimizer)
                weighted = torch.stack([t.detach() for t in terms.values()]) * batch.n_cells
                totals = weighted if totals is None else totals + weighted
                names = names or list(terms)
            # One host sync per epoch, not per batch; with several processes, one all_reduce.
            if loader.world_size > 1:
                dist.all_reduce(totals)
            means = (totals / cells_per_epoch).tolist()
            if not np.all(np.isfinite(means)):
                raise TrainingDivergedError(
                    f"Training diverged: the loss became {means[0]} in epoch {epoch + 1} of "
                    f"{epochs}. Try a lower learning rate (lr={lr:g} now, e.g. lr={lr / 10:g}), "
                    "or check the input's scale."
                )
            history.append(means)
            if early_stopping is None:
                bar.set_postfix(loss=f"{means[0]:.4g}", refresh=False)
                continue
            value = held_out_loss(module, held_out)
            if not np.isfinite(value):
                raise TrainingDivergedError(
                    f"Training diverged: the held-out loss became {value} in epoch {epoch + 1}. "
                    f"Try a lower learning rate (lr={lr:g} now, e.g. lr={lr / 10:g})."
                )
            held_history.append(value)
            if best is None or value < best[0] - early_stopping.min_delta * abs(best[0]):
                # A copy, not a reference: the optimizer updates the parameters in place.
                state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                best = (value, epoch + 1, step, state)
            bar.set_postfix(loss=f"{means[0]:.4g}", held_out=f"{value:.4g}", refresh=False)
            if step - best[2] >= early_stopping.patience:
                bar.set_description(f"{description}, stopped early at step {step}", refresh=False)
                break
    bar.close()
    seconds = time.perf_counter() - start
    values = np.asarray(history, dtype=np.float64).reshape(len(history), -1)
    result = TrainingResult(
        {n: values[:, i] for i, n in enumerate(names or [])}, seconds, len(history), step
    )
    if best is not None:
        module.load_state_dict(best[3])
        result.history["held_out_loss"] = np.asarray(held_history, dtype=np.float64)
        result.best_epoch, result.best_step = best[1], best[2]
    return result
