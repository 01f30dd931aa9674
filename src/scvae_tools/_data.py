"""The one data path from an AnnData (or a matrix) to minibatches.

Sparse input stays sparse: each minibatch is cut from the CSR matrix and handed to the model as
CSR tensors, so memory never grows with ``n_cells x n_genes``. AnnData opened with ``backed="r"``
is read batch by batch from disk.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .models._nn import Batch

__all__ = [
    "MinibatchLoader",
    "batch_covariates",
    "get_matrix",
    "iter_row_blocks",
    "validate_matrix",
]

#: Rows read at a time when a whole matrix is scanned (validation, encoding).
_BLOCK_ROWS = 8192
# Minibatches are cut a few at a time, up to this many stored values (~64 MB as CSR plus its
# transpose): back-to-back, the cutting runs ~2x faster than between training steps, whose
# multi-megabyte tensors evict the loader's working set from the caches.
_CUT_AHEAD_VALUES = 1 << 22


def check_anndata(adata: Any) -> None:
    """Raise a clear error unless ``adata`` is an AnnData with at least one cell and one gene."""
    if not isinstance(adata, AnnData):
        raise TypeError(
            f"Expected an AnnData, got {type(adata).__name__}. Wrap a matrix with "
            "`anndata.AnnData(X)` first."
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); at least one "
            "cell and one gene are needed. Check the filtering steps that produced it."
        )


def get_matrix(adata: AnnData, layer: str | None = None) -> Any:
    """The matrix a tool trains on: ``adata.X`` or ``adata.layers[layer]``.

    Parameters
    ----------
    adata
        Annotated data matrix of shape ``(n_obs, n_vars)``.
    layer
        Name of a layer, or None for ``adata.X``.

    Returns
    -------
    A dense array, a SciPy sparse matrix or, for backed AnnData, the on-disk dataset.

    Raises
    ------
    TypeError
        ``adata`` is not an AnnData.
    ValueError
        The AnnData has no cells or no genes, or ``X`` is missing.
    KeyError
        ``layer`` is not one of ``adata.layers``.
    """
    check_anndata(adata)
    if layer is not None:
        if layer not in adata.layers:
            present = ", ".join(repr(k) for k in adata.layers.keys()) or "none"
            raise KeyError(
                f"Layer {layer!r} not found in adata.layers (present: {present}). "
                "Pass one of these as `layer=`, or `layer=None` to use adata.X."
            )
        return adata.layers[layer]
    if adata.X is None:
        raise ValueError("adata.X is None. Pass `layer=` to train on one of adata.layers.")
    return adata.X


def batch_covariates(
    adata: AnnData, batch_key: str, categories: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """The one-hot batch of each cell, from the categorical column ``adata.obs[batch_key]``.

    Parameters
    ----------
    adata
        Annotated data matrix of shape ``(n_obs, n_vars)``.
    batch_key
        Column of ``adata.obs``; its values are compared as strings.
    categories
        The known batches (those of a fitted model), in order; None takes the column's own
        (sorted, only those present).

    Returns
    -------
    The one-hot matrix, float32 ``(n_obs, n_batches)``, and the categories.

    Raises
    ------
    TypeError
        ``batch_key`` is not a string.
    KeyError
        ``batch_key`` is not a column of ``adata.obs``.
    ValueError
        The column has missing values, or values not among ``categories``.
    """
    if not isinstance(batch_key, str) or not batch_key:
        raise TypeError(f"`batch_key` must be a column name (a string), got {batch_key!r}.")
    if batch_key not in adata.obs.columns:
        present = ", ".join(repr(c) for c in adata.obs.columns[:20]) or "none"
        raise KeyError(
            f"batch_key={batch_key!r} is not a column of adata.obs (columns: {present}). Add "
            "the batch of each cell there, or pass the name of the column that holds it."
        )
    column = adata.obs[batch_key]
    missing = column.isna().to_numpy()
    if missing.any():
        cells = ", ".join(map(str, adata.obs_names[missing][:3]))
        raise ValueError(
            f"adata.obs[{batch_key!r}] has {int(missing.sum())} missing value(s) (e.g. cells "
            f"{cells}); every cell needs a batch. Fill them in, or subset to cells with one."
        )
    values = column.astype(str).to_numpy()
    if categories is None:
        categories = sorted(set(values))
    codes = pd.Index(categories).get_indexer(values)
    if (codes < 0).any():
        unknown = sorted(set(values[codes < 0]))
        raise ValueError(
            f"adata.obs[{batch_key!r}] has batch(es) the model was not trained on: "
            f"{unknown[:10]} (known: {categories}). Encode only cells of known batches, or "
            "train on all batches."
        )
    onehot = np.zeros((len(values), len(categories)), dtype=np.float32)
    onehot[np.arange(len(values)), codes] = 1.0
    return onehot, list(categories)


def _is_backed_sparse(X: Any) -> bool:
    return hasattr(X, "format") and hasattr(X, "group") and not sp.issparse(X)


def _take_rows(X: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` (sorted) of any supported matrix, in memory."""
    if sp.issparse(X) or isinstance(X, np.ndarray):
        return X[rows]
    if _is_backed_sparse(X):
        return X[rows]
    # h5py dataset (backed dense), or array-likes such as np.matrix
    return np.asarray(X[rows])


def iter_row_blocks(X: Any, block_rows: int = _BLOCK_ROWS) -> Iterator[Any]:
    """Consecutive row blocks of ``X``, each in memory (dense or CSR)."""
    n = X.shape[0]
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        if _is_backed_sparse(X) or sp.issparse(X):
            yield X[start:stop]
        else:
            yield np.asarray(X[start:stop])


def validate_matrix(X: Any, *, name: str = "adata.X", counts_for: str | None = None) -> None:
    """Raise if ``X`` holds NaN or infinite values; scans it block by block.

    Also warns once when the values look like raw counts, which the squared-error models are not
    meant for. With ``counts_for`` (the name of a count likelihood), raises instead unless
    every value is a non-negative integer, and does not warn.
    """
    if len(X.shape) != 2:
        raise ValueError(f"{name} must be 2-D (cells x genes), got shape {X.shape}.")
    if counts_for is not None:
        _validate_counts(X, name, counts_for)
        return
    bad = 0
    looks_like_counts = True
    max_value = 0.0
    for block in iter_row_blocks(X):
        values = block.data if sp.issparse(block) else np.asarray(block)
        if values.dtype.kind not in "biuf":
            raise TypeError(
                f"{name} has dtype {values.dtype}; a numeric matrix is needed (cast it with "
                "`.astype(np.float32)`)."
            )
        if values.dtype.kind == "f" and values.size:
            # NaN and inf make the sum non-finite: one fast reduction for the common clean case.
            if not np.isfinite(values.sum(dtype=np.float64)):
                bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            if looks_like_counts:
                # Normalised data shows a fractional value within its first few thousand.
                head = values[:4096]
                looks_like_counts = bool(np.all(np.mod(head[np.isfinite(head)], 1) == 0))
                if looks_like_counts:
                    finite = values[np.isfinite(values)]
                    looks_like_counts = bool(np.all(np.mod(finite, 1) == 0))
        if looks_like_counts and values.size:
            max_value = max(max_value, float(np.nanmax(np.where(np.isfinite(values), values, 0))))
    if bad:
        raise ValueError(
            f"{name} contains {bad} NaN or infinite value(s). Remove or impute them first, for "
            "example with `np.nan_to_num`, or pick a clean matrix with `layer=`."
        )
    if looks_like_counts and max_value > 100:
        warnings.warn(
            f"{name} looks like raw counts (integers up to {max_value:g}). The models reconstruct "
            "values by squared error and are meant for log-normalised data: run "
            "`sc.pp.normalize_total(adata, target_sum=1e4)` and `sc.pp.log1p(adata)` first, or "
            "pass a normalised `layer=`.",
            UserWarning,
            stacklevel=3,
        )


def _validate_counts(X: Any, name: str, likelihood: str) -> None:
    problems = {"NaN or infinite": 0, "negative": 0, "non-integer": 0}
    example = None
    for block in iter_row_blocks(X):
        values = block.data if sp.issparse(block) else np.asarray(block)
        if values.dtype.kind not in "biuf":
            raise TypeError(
                f"{name} has dtype {values.dtype}; a numeric matrix of counts is needed."
            )
        if values.dtype.kind == "f":
            finite = np.isfinite(values)
            problems["NaN or infinite"] += int(values.size - np.count_nonzero(finite))
            fractional = finite & (values != np.round(values))
            problems["non-integer"] += int(np.count_nonzero(fractional))
            if example is None and fractional.any():
                example = float(values[fractional][0])
        negative = values < 0
        problems["negative"] += int(np.count_nonzero(negative))
        if example is None and negative.any():
            example = float(values[negative][0])
    found = [f"{n} {kind}" for kind, n in problems.items() if n]
    if found:
        seen = f" (e.g. {example:g})" if example is not None else ""
        raise ValueError(
            f"likelihood={likelihood!r} models raw counts, but {name} holds "
            f"{', '.join(found)} value(s){seen}: it does not look like counts. Pass the raw "
            "counts, e.g. `layer='counts'`, or use likelihood='gaussian' for log-normalised data."
        )


def _row_sq_norms(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    r"""Squared norm of each CSR row, :math:`\sum_g x_g^2`."""
    sums = np.zeros(len(indptr) - 1, dtype=np.float64)
    nonempty = indptr[1:] > indptr[:-1]
    if nonempty.any():
        # Segments between the starts of consecutive non-empty rows are exactly those rows.
        sums[nonempty] = np.add.reduceat(np.square(values, dtype=np.float64), indptr[:-1][nonempty])
    return sums.astype(np.float32)


def to_batch(block: Any, *, for_training: bool = False) -> Batch:
    """One in-memory block of rows as a :class:`~scvae_tools.models.Batch`.

    With ``for_training``, sparse blocks also carry their transpose (as torch CSR), which the
    backward pass of the first layer multiplies with.
    """
    if sp.issparse(block):
        block = sp.csr_matrix(block)
        if not block.has_canonical_format:
            block = block.copy()
            block.sum_duplicates()
        if block.dtype != np.float32:
            block = block.astype(np.float32)
        # torch takes scipy's int32 index arrays as they are: no int64 copies per batch.
        index_dtype = np.result_type(block.indices.dtype, block.indptr.dtype)
        indices = block.indices.astype(index_dtype, copy=False)
        indptr = block.indptr.astype(index_dtype, copy=False)
        transposed = None
        if for_training:
            # The CSC arrays of the batch are exactly the CSR arrays of its transpose.
            csc = block.tocsc()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
                transposed = torch.sparse_csr_tensor(
                    torch.from_numpy(csc.indptr.astype(index_dtype, copy=False)),
                    torch.from_numpy(csc.indices.astype(index_dtype, copy=False)),
                    torch.from_numpy(csc.data),
                    size=csc.shape[::-1],
                    check_invariants=False,
                )
        return Batch(
            n_cells=block.shape[0],
            sq_norm=torch.from_numpy(_row_sq_norms(indptr, block.data)),
            indices=torch.from_numpy(indices),
            offsets=torch.from_numpy(indptr[:-1]),
            values=torch.from_numpy(block.data),
            transposed=transposed,
        )
    dense = np.ascontiguousarray(block, dtype=np.float32)
    dense_t = torch.from_numpy(dense)
    return Batch(n_cells=dense.shape[0], sq_norm=dense_t.pow(2).sum(1), dense=dense_t)


class MinibatchLoader:
    """Shuffled minibatches of the rows of ``X``, built without a per-cell Dataset.

    Parameters
    ----------
    X
        Dense array, SciPy sparse matrix (CSC is converted to CSR once) or backed dataset,
        shape ``(n_cells, n_genes)``.
    batch_size
        Cells per minibatch; the last one may be smaller.
    device
        Where batches are sent.
    covariates
        Per-cell covariates (the one-hot batch), shape ``(n_cells, n_covariates)``, sliced with
        the rows into each :class:`~scvae_tools.models.Batch`; None for none.
    """

    def __init__(
        self,
        X: Any,
        batch_size: int,
        device: torch.device | str = "cpu",
        covariates: np.ndarray | None = None,
    ):
        if sp.issparse(X) and X.format != "csr":
            X = sp.csr_matrix(X)
        self.X = X
        self.covariates = None if covariates is None else np.asarray(covariates, np.float32)
        self.n_cells = X.shape[0]
        self.batch_size = batch_size
        self.device = torch.device(device)

    def __len__(self) -> int:
        return -(-self.n_cells // self.batch_size)

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        """One pass over all cells in an order drawn from ``rng``."""
        order = rng.permutation(self.n_cells)
        ready: list[Batch] = []
        held = 0
        for start in range(0, self.n_cells, self.batch_size):
            # Sorted rows read faster from CSR and from disk; order within a batch is irrelevant.
            rows = np.sort(order[start : start + self.batch_size])
            batch = to_batch(_take_rows(self.X, rows), for_training=True)
            batch = self._with_covariates(batch, rows).to(self.device)
            ready.append(batch)
            held += batch.n_values
            if held >= _CUT_AHEAD_VALUES:
                yield from ready
                ready, held = [], 0
        yield from ready

    def sequential(self, block_rows: int = 4096) -> Iterator[Batch]:
        """All cells in their order, for encoding."""
        for start, block in zip(
            range(0, self.n_cells, block_rows), iter_row_blocks(self.X, block_rows), strict=True
        ):
            rows = np.arange(start, start + block.shape[0])
            yield self._with_covariates(to_batch(block), rows).to(self.device)

    def _with_covariates(self, batch: Batch, rows: np.ndarray) -> Batch:
        if self.covariates is not None:
            batch.covariates = torch.from_numpy(self.covariates[rows])
        return batch
