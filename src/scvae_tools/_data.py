"""The one data path from an AnnData (or a matrix) to minibatches.

Sparse input stays sparse: each minibatch is cut from the CSR matrix and handed to the model as
CSR tensors, so memory never grows with ``n_cells x n_genes``.

AnnData opened with ``backed="r"`` is trained out of core. Its rows are read in windows of a few
tens of thousands of cells (:func:`window_rows`): an epoch shuffles the order of blocks of
:data:`SHUFFLE_BLOCK_ROWS` contiguous rows, reads a window of blocks at a time, shuffles the rows
within the window and cuts the minibatches from it exactly as from an in-memory matrix. A
background thread reads the next window while the model trains on the current one (h5py releases
the GIL while it reads). A file whose cells fit in one window is shuffled exactly as in memory.

With several processes (``rank``/``world_size``), each epoch's order is split into equal
contiguous shards, padded by repeating cells from the start of the order as
``torch.utils.data.DistributedSampler`` does, so that every process runs the same number
of steps; each process reads only its shard.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .models._nn import Batch

__all__ = [
    "SHUFFLE_BLOCK_ROWS",
    "MinibatchLoader",
    "batch_covariates",
    "check_backed_format",
    "gene_std",
    "get_matrix",
    "is_backed",
    "iter_row_blocks",
    "obs_column",
    "validate_matrix",
    "window_rows",
]

#: Rows read at a time when a whole matrix is scanned (validation, encoding).
_BLOCK_ROWS = 8192
# Minibatches are cut a few at a time, up to this many stored values (~64 MB as CSR plus its
# transpose): back-to-back, the cutting runs ~2x faster than between training steps, whose
# multi-megabyte tensors evict the loader's working set from the caches.
_CUT_AHEAD_VALUES = 1 << 22
#: Contiguous rows that backed training reads as one block; the epoch shuffles the blocks' order.
#: scverse's annbatch reads chunks of the same order (512 rows by default).
SHUFFLE_BLOCK_ROWS = 512
# Stored values per window of backed training (~128 MB as float32 values plus int32 indices);
# about 16,000 cells at 1,000 non-zeros each. Two windows are in memory at a time (the one
# being trained on and the next, being read), plus the minibatches cut from the first.
_WINDOW_VALUES = 1 << 24


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


def obs_column(
    adata: AnnData, key: Any, *, argument: str, what: str, allow_missing: bool = False
) -> np.ndarray:
    """The values of column ``adata.obs[key]`` as strings, after checking it can serve.

    The one check of an obs column named by an argument (a batch, a label, a grouping), so that
    every tool words the same problem the same way.

    Parameters
    ----------
    adata
        Annotated data matrix of shape ``(n_obs, n_vars)``.
    key
        The column's name.
    argument
        The argument that named it, for the messages (``"batch_key"``).
    what
        What each cell's value is, for the messages (``"batch"``, ``"label"``).
    allow_missing
        Accept missing values (they become ``"nan"``).

    Returns
    -------
    The values, a string array of shape ``(n_obs,)``.

    Raises
    ------
    TypeError
        ``key`` is not a non-empty string.
    KeyError
        ``key`` is not a column of ``adata.obs``; names the columns there.
    ValueError
        The column has missing values (unless ``allow_missing``); names how many and the
        first cells.
    """
    if not isinstance(key, str) or not key:
        raise TypeError(f"`{argument}` must be a column name of adata.obs, got {key!r}.")
    if key not in adata.obs.columns:
        present = ", ".join(repr(c) for c in adata.obs.columns[:20]) or "none"
        raise KeyError(
            f"{argument}={key!r} is not a column of adata.obs (columns: {present}). Add the "
            f"{what} of each cell there, or pass the name of the column that holds it."
        )
    column = adata.obs[key]
    missing = column.isna().to_numpy()
    if missing.any() and not allow_missing:
        cells = ", ".join(map(str, adata.obs_names[missing][:3]))
        raise ValueError(
            f"adata.obs[{key!r}] has {int(missing.sum())} missing value(s) (e.g. cells {cells});"
            f" every cell needs a {what}. Fill them in, or subset to the cells with one "
            f"(adata[adata.obs[{key!r}].notna()])."
        )
    return column.astype(str).to_numpy()


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
    values = obs_column(adata, batch_key, argument="batch_key", what="batch")
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


def is_backed(X: Any) -> bool:
    """Whether ``X`` lives on disk: a backed sparse dataset or an h5py/zarr dense dataset."""
    if sp.issparse(X) or isinstance(X, np.ndarray):
        return False
    return _is_backed_sparse(X) or (hasattr(X, "chunks") and hasattr(X, "dtype"))


def check_backed_format(X: Any, *, name: str = "adata.X") -> None:
    """Raise unless an on-disk ``X`` can be read by rows: CSR or dense, not CSC.

    A CSC matrix on disk stores each gene's cells together, so reading one block of cells reads
    the whole file; it is refused instead of being read that way.
    """
    if _is_backed_sparse(X) and X.format != "csr":
        raise ValueError(
            f"{name} is stored on disk as {X.format.upper()}, but out-of-core training reads "
            "blocks of cells and needs CSR (cells as rows). Rewrite the file as CSR once, e.g. "
            "`adata = sc.read_h5ad(path); adata.X = adata.X.tocsr(); adata.write_h5ad(path_csr)` "
            "if it fits in memory, or open it without `backed=` to train in memory."
        )


def _take_rows(X: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` (sorted) of any supported matrix, in memory."""
    if sp.issparse(X) or isinstance(X, np.ndarray):
        return X[rows]
    if _is_backed_sparse(X):
        return X[rows]
    # h5py dataset (backed dense), or array-likes such as np.matrix
    return np.asarray(X[rows])


def _drawn_blocks(
    X: Any, *, log1p: bool, max_rows: int, random_state: int, name: str
) -> Iterator[Any]:
    """At most ``max_rows`` cells of ``X`` drawn at random, in float64 row blocks (dense or CSR).

    Chunks of rows, so a dense matrix of all genes is never copied whole in float64; on disk,
    chunks of at most a training window, read by the checked reader of training (a NaN among
    the cells drawn raises as it would there).
    """
    n = X.shape[0]
    rows = np.arange(n)
    if n > max_rows:
        rows = np.sort(np.random.default_rng(random_state).choice(n, max_rows, replace=False))
    reader = _RowReader(X, name) if is_backed(X) else None
    step = 1024 if reader is None else window_rows(reader.values_per_row(), 1)
    for first in range(0, len(rows), step):
        chunk = rows[first : first + step]
        block = _take_rows(X, chunk) if reader is None else reader.read(chunk)
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float64, copy=True)
            if log1p:
                block.data = np.log1p(block.data)
        else:
            block = np.asarray(block, dtype=np.float64)
            if log1p:
                block = np.log1p(block)
        yield block


def gene_std(
    X: Any,
    *,
    log1p: bool = False,
    max_rows: int = 10_000,
    random_state: int = 0,
    name: str = "adata.X",
) -> np.ndarray:
    """Standard deviation of each gene over at most ``max_rows`` cells drawn at random.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)``, any supported matrix (dense, CSR/CSC, backed). Not modified.
    log1p
        Take ``log(1 + x)`` first (the count likelihoods' encoder input).
    max_rows
        Cells read at most (default 10,000): the result only sets an initialisation scale.
    random_state
        Seed of the draw of cells.
    name
        How errors name ``X``: on-disk data is read by the checked reader of training, so a
        NaN among the cells drawn raises as it would there.

    Returns
    -------
    Shape ``(n_genes,)``, float64; 0 for a gene that is constant over the cells read.
    """
    total = np.zeros(X.shape[1])
    total_sq = np.zeros(X.shape[1])
    n = 0
    for block in _drawn_blocks(
        X, log1p=log1p, max_rows=max_rows, random_state=random_state, name=name
    ):
        n += block.shape[0]
        if sp.issparse(block):
            total += np.asarray(block.sum(axis=0)).ravel()
            total_sq += np.asarray(block.multiply(block).sum(axis=0)).ravel()
        else:
            total += block.sum(axis=0)
            total_sq += (block * block).sum(axis=0)
    mean = total / n
    return np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))


def principal_axes(
    X: Any,
    n_comps: int,
    *,
    log1p: bool = False,
    max_rows: int = 4_000,
    random_state: int = 0,
    name: str = "adata.X",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading principal axes of at most ``max_rows`` cells drawn at random.

    A randomized SVD (Halko, Martinsson & Tropp 2011: ``n_comps + 10`` columns, 4 power
    iterations) of the centred cells, centred implicitly so that sparse data is never made
    dense, with products in float64; unlike ARPACK it does not fail on degenerate input (an
    integer matrix, huge values, fewer cells than axes).

    Parameters
    ----------
    X
        ``(n_cells, n_genes)``, any supported matrix (dense, CSR/CSC, backed). Not modified.
    n_comps
        Axes to return. Where the cells drawn or the genes are no more than ``n_comps``, the
        axes beyond their rank are zeros.
    log1p
        Take ``log(1 + x)`` first (the count likelihoods' encoder input).
    max_rows
        Cells read at most (default 4,000): the axes only set an initialisation.
    random_state
        Seed of the draw of cells and of the random projection.
    name
        How errors name ``X`` (see :func:`gene_std`).

    Returns
    -------
    ``mean`` ``(n_genes,)``, ``components`` ``(n_comps, n_genes)`` (each axis's sign chosen so
    that its largest loading is positive) and ``variance`` ``(n_comps,)``, the variance of the
    cells' scores along each axis (``n - 1`` in the denominator), largest first.
    """
    blocks: list[Any] = []
    total = np.zeros(X.shape[1])
    for block in _drawn_blocks(
        X, log1p=log1p, max_rows=max_rows, random_state=random_state, name=name
    ):
        total += np.asarray(block.sum(axis=0)).ravel()
        # Dense cells are kept in float32 (half the memory) and multiplied a block at a time.
        blocks.append(block if sp.issparse(block) else block.astype(np.float32))
    n = sum(b.shape[0] for b in blocks)
    mean = total / n

    def as64(b: Any) -> Any:
        return b if sp.issparse(b) else b.astype(np.float64)

    def centred_times(B: np.ndarray) -> np.ndarray:  # (cells - mean) @ B, block by block
        return np.vstack([as64(b) @ B for b in blocks]) - mean @ B

    def centred_t_times(C: np.ndarray) -> np.ndarray:  # (cells - mean).T @ C
        out = -np.outer(mean, C.sum(axis=0))
        first = 0
        for b in blocks:
            out += as64(b).T @ C[first : first + b.shape[0]]
            first += b.shape[0]
        return out

    width = min(n_comps + 10, n, X.shape[1])
    rng = np.random.default_rng(random_state)
    Q = np.linalg.qr(centred_times(rng.standard_normal((X.shape[1], width))))[0]
    for _ in range(4):
        Q = np.linalg.qr(centred_times(np.linalg.qr(centred_t_times(Q))[0]))[0]
    _, s, vt = np.linalg.svd(centred_t_times(Q).T, full_matrices=False)
    # Float32 input: a singular value below its resolution is rounding, not an axis.
    rank = int((s > s.max(initial=0.0) * max(n, X.shape[1]) * np.finfo(np.float32).eps).sum())
    k = min(n_comps, rank)
    components = np.zeros((n_comps, X.shape[1]))
    variance = np.zeros(n_comps)
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
    components[:k] = vt[:k] * signs[:, None]
    variance[:k] = s[:k] ** 2 / max(n - 1, 1)
    return mean, components, variance


def iter_row_blocks(
    X: Any, block_rows: int = _BLOCK_ROWS, start: int = 0, stop: int | None = None
) -> Iterator[Any]:
    """Consecutive row blocks of rows ``start:stop`` of ``X``, each in memory (dense or CSR)."""
    n = X.shape[0] if stop is None else stop
    for first in range(start, n, block_rows):
        last = min(first + block_rows, n)
        if _is_backed_sparse(X) or sp.issparse(X):
            yield X[first:last]
        else:
            yield np.asarray(X[first:last])


def validate_matrix(
    X: Any, *, name: str = "adata.X", counts_for: str | None = None, first_block_only: bool = False
) -> None:
    """Raise if ``X`` holds NaN or infinite values; scans it block by block.

    Also warns once when the values look like raw counts, which the squared-error models are not
    meant for. With ``counts_for`` (the name of a count likelihood), raises instead unless
    every value is a non-negative integer, and does not warn. With ``first_block_only`` only the
    first block of rows is scanned: for on-disk data, whose NaN/inf check happens as the
    training and encoding passes read it (:class:`MinibatchLoader`), so that a short call on a
    huge file reads it no more often than training needs.
    """
    if len(X.shape) != 2:
        raise ValueError(f"{name} must be 2-D (cells x genes), got shape {X.shape}.")
    if counts_for is not None:
        _validate_counts(X, name, counts_for, first_block_only)
        return
    bad = 0
    looks_like_counts = True
    max_value = 0.0
    for block in _blocks_to_check(X, first_block_only):
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


def _blocks_to_check(X: Any, first_block_only: bool) -> Iterator[Any]:
    """The row blocks a validation scans: all of them, or only the first (on-disk data)."""
    blocks = iter_row_blocks(X)
    return itertools.islice(blocks, 1) if first_block_only else blocks


def _validate_counts(X: Any, name: str, likelihood: str, first_block_only: bool = False) -> None:
    problems = {"NaN or infinite": 0, "negative": 0, "non-integer": 0}
    example = None
    for block in _blocks_to_check(X, first_block_only):
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


def window_rows(values_per_row: float, batch_size: int) -> int:
    """Rows per window of out-of-core training: a whole number of minibatches, ~16M values."""
    return max(1, int(_WINDOW_VALUES / (max(values_per_row, 1.0) * batch_size))) * batch_size


def _read_into(dataset: Any, lo: int, hi: int, out: np.ndarray, pos: int) -> None:
    if hi <= lo:
        return
    if hasattr(dataset, "read_direct"):  # h5py: straight into ``out``, with the GIL released
        dataset.read_direct(out, np.s_[lo:hi], np.s_[pos : pos + hi - lo])
    else:  # zarr
        out[pos : pos + hi - lo] = dataset[lo:hi]


class _RowReader:
    """Reads sets of rows of an on-disk matrix (CSR, or dense) into memory, run by run.

    The CSR's ``indptr`` (8 bytes per cell) is read once; each read then fetches the values and
    indices of each run of consecutive rows with one read per array. Every read is checked for
    NaN and infinite values, which replaces the scan of the whole matrix before training.
    """

    def __init__(self, X: Any, name: str):
        check_backed_format(X, name=name)
        self.X = X
        self.name = name
        self.n_genes = int(X.shape[1])
        self.sparse = _is_backed_sparse(X)
        if self.sparse:
            group = X.group
            self.indptr = np.asarray(group["indptr"][...], dtype=np.int64)
            self.data, self.indices = group["data"], group["indices"]

    def values_per_row(self) -> float:
        """Stored values per cell, on average."""
        if self.sparse:
            return float(self.indptr[-1]) / max(len(self.indptr) - 1, 1)
        return float(self.n_genes)

    def read(self, rows: np.ndarray) -> Any:
        """Rows ``rows`` (sorted, distinct) as one in-memory block, CSR or dense."""
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = rows[np.r_[0, breaks]]
        stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
        if self.sparse:
            lengths = self.indptr[rows + 1] - self.indptr[rows]
            indptr = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=indptr[1:])
            nnz = int(indptr[-1])
            data = np.empty(nnz, dtype=self.data.dtype)
            indices = np.empty(nnz, dtype=self.indices.dtype)
            pos = 0
            for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
                lo, hi = int(self.indptr[a]), int(self.indptr[b])
                _read_into(self.data, lo, hi, data, pos)
                _read_into(self.indices, lo, hi, indices, pos)
                pos += hi - lo
            index_dtype = np.int32 if max(nnz, self.n_genes) < 2**31 else np.int64
            block = sp.csr_matrix(
                (data, indices.astype(index_dtype, copy=False), indptr.astype(index_dtype)),
                shape=(len(rows), self.n_genes),
            )
            values = data
        else:
            block = np.concatenate(
                [np.asarray(self.X[a:b]) for a, b in zip(starts, stops, strict=True)]
            )
            values = block
        if values.dtype.kind == "f" and not np.isfinite(values.sum(dtype=np.float64)):
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            raise ValueError(
                f"{self.name} contains NaN or infinite value(s) ({bad} among rows {rows[0]} to "
                f"{rows[-1]}), found while reading it from disk (on-disk data is checked as "
                "training reads it, not in a pass of its own). Remove or impute them first, "
                "for example with `np.nan_to_num`, or pick a clean matrix with `layer=`."
            )
        return block


class MinibatchLoader:
    """Shuffled minibatches of the rows of ``X``, built without a per-cell Dataset.

    In memory, each epoch is a permutation of all cells. On disk (``backed="r"``), each epoch
    shuffles the order of blocks of :data:`SHUFFLE_BLOCK_ROWS` contiguous rows and the rows
    within each window of blocks that is read at a time (see the module's docstring); a
    background thread reads the next window while the current one trains. With several
    processes, each takes its shard of every epoch's order.

    Parameters
    ----------
    X
        Dense array, SciPy sparse matrix (CSC is converted to CSR once) or on-disk dataset (CSR
        or dense; CSC on disk is refused), shape ``(n_cells, n_genes)``.
    batch_size
        Cells per minibatch of this process; the last one may be smaller.
    device
        Where batches are sent.
    covariates
        Per-cell covariates (the one-hot batch), shape ``(n_cells, n_covariates)``, sliced with
        the rows into each :class:`~scvae_tools.models.Batch`; None for none.
    rank
        This process's rank among ``world_size`` data-parallel processes.
    world_size
        Number of processes that share each epoch; 1 for one process.
    name
        How error messages call ``X`` (``"adata.X"``, ``"adata.layers['counts']"``).
    held_out
        Rows kept out of training (sorted, distinct), for a held-out loss
        (:meth:`held_out_batches`); None trains on all rows.
    """

    def __init__(
        self,
        X: Any,
        batch_size: int,
        device: torch.device | str = "cpu",
        covariates: np.ndarray | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        name: str = "adata.X",
        held_out: np.ndarray | None = None,
    ):
        if sp.issparse(X) and X.format != "csr":
            X = sp.csr_matrix(X)
        self.X = X
        self.covariates = None if covariates is None else np.asarray(covariates, np.float32)
        self.n_cells = X.shape[0]
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.held_out = None if held_out is None else np.unique(np.asarray(held_out, np.int64))
        # Which rows train (a mask, for the block order of backed data) and their numbers.
        self._keep: np.ndarray | None = None
        self._train_rows: np.ndarray | None = None
        if self.held_out is not None:
            self._keep = np.ones(self.n_cells, dtype=bool)
            self._keep[self.held_out] = False
            self._train_rows = np.flatnonzero(self._keep)
            if not len(self._train_rows):
                raise ValueError("No cells are left to train on after holding some out.")
        #: Cells trained on: all, or all but the held-out ones.
        self.n_train = self.n_cells if self._train_rows is None else len(self._train_rows)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}.")
        if world_size > self.n_train:
            raise ValueError(
                f"{world_size} processes for {self.n_train} cells: each process needs at least "
                "one cell. Use at most as many processes as cells."
            )
        self.rank, self.world_size = rank, world_size
        #: Cells this process trains on per epoch, the same for every process.
        self.shard_size = -(-self.n_train // world_size)
        self._reader = _RowReader(X, name) if is_backed(X) else None
        self.window_rows = (
            window_rows(self._reader.values_per_row(), batch_size) if self._reader else None
        )

    def __len__(self) -> int:
        return -(-self.shard_size // self.batch_size)

    @property
    def backed(self) -> bool:
        """Whether ``X`` is read from disk window by window."""
        return self._reader is not None

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        """One pass over this process's shard of all cells, in an order drawn from ``rng``.

        Every process must pass a generator in the same state: they draw the same global order
        and each takes its own shard of it.
        """
        order = self._order(rng)
        if self._reader is None:
            yield from self._cut(self.X, order)
            return
        step = self.window_rows
        windows = [order[i : i + step] for i in range(0, len(order), step)]
        for block, positions, distinct in self._read_ahead(windows):
            yield from self._cut(block, positions, distinct)

    def held_out_batches(self, block_rows: int = 4096) -> list[Batch]:
        """The held-out rows as minibatches on :attr:`device`, read once (empty if none)."""
        if self.held_out is None:
            return []
        rows = self.held_out
        block = self._reader.read(rows) if self._reader is not None else _take_rows(self.X, rows)
        batches = []
        for i in range(0, len(rows), block_rows):
            batch = to_batch(block[i : i + block_rows])
            batches.append(self._with_covariates(batch, rows[i : i + block_rows]).to(self.device))
        return batches

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        """The cells of this process for one epoch, in training order."""
        n = self.n_cells
        if self._reader is None or self.shard_size <= self.window_rows:
            # In memory, or each shard fits in one window: a full shuffle of all cells.
            if self._train_rows is not None:
                return self._shard(rng.permutation(self._train_rows))
            return self._shard(rng.permutation(n))
        block = SHUFFLE_BLOCK_ROWS
        starts = rng.permutation(-(-n // block)) * block
        lengths = np.minimum(starts + block, n) - starts
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        order = np.repeat(starts, lengths) + (np.arange(n) - first)
        if self._keep is not None:
            order = order[self._keep[order]]
        order = self._shard(order)
        # The rows of each window are shuffled from a generator of this process's own, so that
        # ``rng`` advances alike in every process and they agree on the next epoch's blocks.
        local = np.random.default_rng([int(rng.integers(2**63)), self.rank])
        for i in range(0, len(order), self.window_rows):
            window = order[i : i + self.window_rows]
            window[:] = window[local.permutation(len(window))]
        return order

    def _shard(self, order: np.ndarray) -> np.ndarray:
        """The contiguous part of ``order`` for this process, padded as DistributedSampler pads."""
        if self.world_size == 1:
            return order
        total = self.shard_size * self.world_size
        if total > len(order):
            order = np.concatenate([order, order[: total - len(order)]])
        return order[self.rank * self.shard_size : (self.rank + 1) * self.shard_size]

    def _cut(self, X: Any, order: np.ndarray, row_ids: np.ndarray | None = None) -> Iterator[Batch]:
        """Minibatches of rows ``order`` of the in-memory ``X``, ``batch_size`` at a time.

        ``row_ids``: the row of the whole matrix of each row of ``X`` (a window read from disk);
        None when ``X`` is the whole matrix.
        """
        ready: list[Batch] = []
        held = 0
        for start in range(0, len(order), self.batch_size):
            # Sorted rows read faster from CSR and from disk; order within a batch is irrelevant.
            rows = np.sort(order[start : start + self.batch_size])
            batch = to_batch(_take_rows(X, rows), for_training=True)
            ids = rows if row_ids is None else row_ids[rows]
            batch = self._with_covariates(batch, ids).to(self.device)
            ready.append(batch)
            held += batch.n_values
            if held >= _CUT_AHEAD_VALUES:
                yield from ready
                ready, held = [], 0
        yield from ready

    def _with_covariates(self, batch: Batch, rows: np.ndarray) -> Batch:
        if self.covariates is not None:
            batch.covariates = torch.from_numpy(self.covariates[rows])
        return batch

    def _read_window(self, rows: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        """The distinct rows of ``rows`` (in memory), their places, and their row numbers.

        Returns the block of distinct rows, where each of ``rows`` lies in it, and which rows
        of the whole matrix the block holds (sorted).
        """
        distinct, positions = np.unique(rows, return_inverse=True)
        return self._reader.read(distinct), positions, distinct

    def _read_ahead(
        self, windows: Iterable[np.ndarray]
    ) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        """:meth:`_read_window` of each window, the next read in a thread while one is used."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scvae-read") as pool:
            pending = None
            for rows in windows:
                future = pool.submit(self._read_window, rows)
                if pending is not None:
                    yield pending.result()
                pending = future
            if pending is not None:
                yield pending.result()

    def sequential(
        self, block_rows: int = 4096, start: int = 0, stop: int | None = None
    ) -> Iterator[Batch]:
        """Cells ``start:stop`` (default: all) in their order, for encoding."""
        stop = self.n_cells if stop is None else stop
        if self._reader is None:
            first = start
            for block in iter_row_blocks(self.X, block_rows, start, stop):
                rows = np.arange(first, first + block.shape[0])
                first += block.shape[0]
                yield self._with_covariates(to_batch(block), rows).to(self.device)
            return
        step = self.window_rows
        windows = (np.arange(a, min(a + step, stop)) for a in range(start, stop, step))
        for block, _, distinct in self._read_ahead(windows):
            for i in range(0, block.shape[0], block_rows):
                batch = to_batch(block[i : i + block_rows])
                yield self._with_covariates(batch, distinct[i : i + block_rows]).to(self.device)
