"""``sv.tl.map_query`` and ``sv.tl.transfer_labels``: reference mapping as scArches.

A reference model trained with ``batch_key`` and ``encode_covariates=True`` is extended with one
one-hot column per new batch of the query (:meth:`~scvae_tools.models.LatentModel.with_batches`),
and only the weights of those columns are trained on the query
(:meth:`~scvae_tools.models.AutoencoderModule.train_batches_only`), so the reference's latent
space stays exactly where it was and the query lands in it. Labels are then carried over by a
distance-weighted kNN vote (:func:`transfer_labels`).
"""

from __future__ import annotations

import copy as copy_module
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._checks import check_bool, check_float, check_int
from .._data import (
    MinibatchLoader,
    batch_covariates,
    check_backed_format,
    get_matrix,
    is_backed,
    iter_row_blocks,
    obs_column,
    validate_matrix,
)
from .._schedule import Auto, training_schedule
from .._training import TrainingDivergedError, train
from ..models._likelihood import LIKELIHOODS
from ..models._model import LatentModel, load
from ._tools import Device, resolve_device

__all__ = ["MIN_SHARED_GENES", "UNKNOWN", "map_query", "transfer_labels"]

#: The least share of the model's genes that a query must have.
MIN_SHARED_GENES = 0.8
#: The label of query cells whose neighbours' vote is too uncertain.
UNKNOWN = "Unknown"


def _as_model(model: Any) -> LatentModel:
    """A :class:`LatentModel`, loading it when given a path."""
    if isinstance(model, LatentModel):
        return model
    if isinstance(model, str | os.PathLike):
        return load(model)
    raise TypeError(
        "`model` must be a LatentModel (from `sv.tl.vae(..., return_model=True)` or "
        f"`sv.models.load(path)`) or the path of a saved model, got {type(model).__name__}."
    )


def model_genes(
    adata: AnnData, X: Any, var_names: list[str], *, name: str = "query"
) -> tuple[Any, int, int]:
    """``X`` with the model's genes as columns, in the model's order.

    Genes are matched by name; genes of the model that ``adata`` lacks are zero columns, genes
    the model does not know are dropped. A backed ``X`` whose genes already match is returned
    as it is; otherwise it is read in blocks of cells, in the model's genes only.

    Parameters
    ----------
    adata
        The AnnData that ``X`` belongs to, shape ``(n_obs, n_vars)``.
    X
        ``adata.X`` or one of its layers.
    var_names
        The model's genes, in order (``n_genes``).
    name
        How the messages call ``adata``.

    Returns
    -------
    The matrix, shape ``(n_obs, n_genes)`` (sparse stays sparse, in ``X``'s dtype), the
    number of the model's genes that were missing, and the number of ``adata``'s genes dropped.

    Raises
    ------
    ValueError
        ``adata.var_names`` has duplicates, or fewer than :data:`MIN_SHARED_GENES` of the
        model's genes are in it.

    Warns
    -----
    UserWarning
        Some of the model's genes are missing (set to zero); names how many.
    """
    genes = pd.Index(np.asarray(adata.var_names, dtype=str))
    if list(genes) == var_names:
        return X, 0, 0
    if not genes.is_unique:
        raise ValueError(
            f"{name}.var_names has duplicates ({genes[genes.duplicated()][:3].tolist()}); genes "
            f"are matched to the model's by name. Run `{name}.var_names_make_unique()` first."
        )
    where = genes.get_indexer(var_names)  # the query column of each model gene, -1 if absent
    present = where >= 0
    n_missing = int((~present).sum())
    n_model = len(var_names)
    if present.sum() < MIN_SHARED_GENES * n_model:
        raise ValueError(
            f"Only {int(present.sum())} of the model's {n_model} genes "
            f"({present.mean():.0%}) are in {name}.var_names; at least "
            f"{MIN_SHARED_GENES:.0%} are needed. Check that both use the same gene identifiers "
            f"(symbols or Ensembl IDs; the model's start with {var_names[:3]}, {name}'s with "
            f"{genes[:3].tolist()})."
        )
    if n_missing:
        examples = [g for g, p in zip(var_names, present, strict=True) if not p][:5]
        warnings.warn(
            f"{n_missing} of the model's {n_model} genes are missing from {name} (e.g. "
            f"{examples}); they are set to zero.",
            UserWarning,
            stacklevel=3,
        )
    n_dropped = len(genes) - int(present.sum())
    # One sparse product selects, orders and zero-fills the columns, sparse or dense.
    select = sp.csr_matrix(
        (np.ones(int(present.sum()), dtype=X.dtype), (where[present], np.flatnonzero(present))),
        shape=(len(genes), n_model),
    )
    if is_backed(X):
        blocks = [block @ select for block in iter_row_blocks(X)]
        out = sp.vstack(blocks, format="csr") if sp.issparse(blocks[0]) else np.vstack(blocks)
    else:
        out = X @ select
    out = sp.csr_matrix(out) if sp.issparse(out) else np.asarray(out)
    return out, n_missing, n_dropped


def map_query(
    query: AnnData,
    model: LatentModel | str | os.PathLike,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    epochs: int | Auto = "auto",
    batch_size: int = 256,
    lr: float = 1e-3,
    random_state: int = 0,
    device: Device = "auto",
    key_added: str | None = None,
    progress: bool = True,
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | LatentModel | tuple[AnnData, LatentModel] | None:
    """Map query cells into a trained reference's latent space (scArches' surgery).

    The query's batches that the model does not know get new one-hot columns in every layer
    that reads the batch (the encoder's first layer, each decoder layer, the output layer),
    each starting as the mean of the reference's columns. Only those new columns are trained
    on the query, with the model's own objective; every reference weight is frozen, so the
    reference cells' codes do not change at all (``model.encode(reference)`` is the same to the
    bit with the extended model) and the query is placed in the same space. Query cells of
    batches the model knows use their existing columns. A query of known batches only is
    encoded without training.

    The reference must be trained with ``batch_key`` and ``encode_covariates=True``, and
    maps best with a linear decoder::

        model = sv.tl.vae(ref, batch_key="sample", encode_covariates=True, decoder="linear",
                          return_model=True)

    Only an encoder that sees the batch can move a new batch's codes. A decoder with hidden
    layers (the ``"shallow"`` default with a ``batch_key``) can absorb much of a new batch's
    effect in its own new columns, so the query's codes move less: on CellBench (reference
    CEL-seq2, query SORT-seq, NB VAE) the linear decoder transferred 93-94 % of the labels
    correctly (seeds 0-2) against 83-90 % with the default (seeds 0 and 1;
    ``benchmarks/bench_mapping.py``). With
    ``encode_covariates=False`` the query is encoded by the reference encoder as it is (its
    decoder columns are still trained), and a warning says so; a model trained without a
    ``batch_key`` encodes the query as it is, without training, with a warning too.

    Parameters
    ----------
    query
        Annotated data matrix of shape ``(n_obs, n_vars)``, preprocessed as the reference was
        (log-normalised for the Gaussian likelihood, raw counts for a count likelihood). Its
        genes are matched to the model's by name: missing genes are set to zero (with a
        warning naming how many), extra genes are dropped; at least 80 % of the model's
        genes must be present. Backed (``backed="r"``) queries work; one whose genes differ
        from the model's is read into memory, in the model's genes, once.
    model
        The reference :class:`~scvae_tools.models.LatentModel` (from ``return_model=True`` of
        ``sv.tl.ae``/``vae``/``vsc``, or :func:`~scvae_tools.models.load`), or the path of a
        saved one. It is left unchanged: the surgery works on a copy.
    layer
        Use ``query.layers[layer]`` instead of ``query.X``.
    batch_key
        Column of ``query.obs`` with each cell's batch; None uses the model's ``batch_key``.
    epochs
        Passes over the query's cells. ``"auto"``: the rule of the tools for the query's
        size (at least 2,200 optimizer steps, else ``min(200, round(8e6 / n_obs))``).
        Ignored when the query has no new batch.
    batch_size
        Cells per minibatch.
    lr
        Adam learning rate of the new columns.
    random_state
        Seed of the minibatch order and the latent samples.
    device
        ``"auto"`` (a GPU when torch sees one), ``"cpu"`` or ``"cuda"``.
    key_added
        Write ``obsm[key_added]`` and ``uns[key_added]``; by default the reference tool's
        keys, ``"X_vae"`` and ``"vae"`` (``ae``, ``vsc`` alike).
    progress
        Show a progress bar over epochs.
    return_model
        Also return the extended model, which encodes reference and query cells (each with
        its batch) and saves and loads as any model.
    copy
        Work on a copy of ``query`` and return it.

    Returns
    -------
    None, or the copy with ``copy=True``, or the extended model with ``return_model=True``,
    or ``(query, model)`` with both. Sets:

    ``query.obsm["X_{kind}"]`` : :class:`numpy.ndarray` ``(n_obs, n_latent)``, float32
        The query's representation in the reference's latent space (and ``"X_vsc_spike"``
        for a VSC, as ``sv.tl.vsc``).
    ``query.uns["{kind}"]`` : :class:`dict`
        ``params``: ``mapped`` (True), the ``model`` kind, its ``likelihood`` and
        configuration, ``layer``, ``batch_key``, ``reference_batch_categories``,
        ``new_batch_categories``, ``batch_categories`` (the extended model's), ``n_genes``
        (the model's), ``n_genes_missing``, ``n_genes_dropped``, ``epochs`` (0 without new
        batches), ``batch_size``, ``n_steps``, ``epochs_auto``, ``lr``, ``random_state``,
        ``device``, ``n_obs``; ``history`` (each loss term per epoch), ``training_time_s``.

    Raises
    ------
    ValueError
        An empty query, NaN or infinite values, a count likelihood on values that are not
        counts, missing values in ``query.obs[batch_key]``, fewer than 80 % of the model's
        genes, duplicated gene names, a file that is not a saved model.
    KeyError
        ``layer`` or ``batch_key`` is not in the query.
    TypeError
        ``model`` is neither a model nor a path.

    Notes
    -----
    On any error nothing is written: the query is left exactly as it was.
    """
    # Everything is checked and computed before the query is touched.
    model = _as_model(model)
    lr = check_float("lr", lr, low=0.0, open_low=True)
    random_state = check_int("random_state", random_state, minimum=0)
    progress = check_bool("progress", progress)
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        raise ValueError(f"`key_added` must be a non-empty string or None, got {key_added!r}.")
    dev = resolve_device(device)

    X = get_matrix(query, layer)
    matrix_name = "query.X" if layer is None else f"query.layers[{layer!r}]"
    if is_backed(X):
        check_backed_format(X, name=matrix_name)
    X, n_missing, n_dropped = model_genes(query, X, model.var_names)
    likelihood = model.likelihood
    counts_for = likelihood if LIKELIHOODS[likelihood].counts else None
    backed = is_backed(X)
    validate_matrix(X, name=matrix_name, counts_for=counts_for, first_block_only=backed)
    schedule = training_schedule(X.shape[0], epochs, batch_size)

    first = len(model.batch_categories)
    key = batch_key if batch_key is not None else model.batch_key
    covariates, new = None, []
    if first:
        values = obs_column(query, key, argument="batch_key", what="batch")
        new = sorted(set(values) - set(model.batch_categories))
        extended = model.with_batches(new) if new else copy_module.deepcopy(model)
        covariates, _ = batch_covariates(query, key, extended.batch_categories)
        if new and extended.module.input_covariates is None:
            warnings.warn(
                "This model's encoder does not see the batch (it was trained with "
                "encode_covariates=False), so mapping cannot move the query's codes: they are "
                "the reference encoder's, and only the decoder learns the new batches. Train "
                f"the reference with `sv.tl.{model.kind}(ref, batch_key=..., "
                "encode_covariates=True, decoder='linear', return_model=True)` to map queries.",
                UserWarning,
                stacklevel=2,
            )
    else:
        if batch_key is not None:
            raise ValueError(
                "This model was trained without a batch_key, so it cannot learn the query's "
                "batches. Train the reference with `batch_key=..., encode_covariates=True`, or "
                "pass batch_key=None to encode the query as it is."
            )
        warnings.warn(
            "This model was trained without a batch_key: the query is encoded by the reference "
            "encoder as it is, and nothing is trained, so its batch effect is not corrected. "
            f"Train the reference with `sv.tl.{model.kind}(ref, batch_key=..., "
            "encode_covariates=True, decoder='linear', return_model=True)` to map queries.",
            UserWarning,
            stacklevel=2,
        )
        extended = copy_module.deepcopy(model)
    extended.module.to(dev)

    result = None
    if new:
        loader = MinibatchLoader(
            X, schedule.batch_size, device=dev, covariates=covariates, name=matrix_name
        )
        description = f"sv.tl.map_query ({model.kind}, {len(new)} new batches): "
        with extended.module.train_batches_only(first):
            result = train(
                extended.module,
                loader,
                epochs=schedule.epochs,
                lr=lr,
                random_state=random_state,
                progress=progress,
                description=description + schedule.describe(),
            )
    extended.module.eval()
    encoded = extended._encode_matrix(
        X,
        batch_size=max(schedule.batch_size, 4096),
        return_spike=model.kind == "vsc",
        covariates=covariates,
    )
    rep, spike = encoded if model.kind == "vsc" else (encoded, None)
    if not np.isfinite(rep).all():
        raise TrainingDivergedError(
            f"Mapping produced non-finite latent values. Try a lower learning rate (lr={lr:g})."
        )

    config = {k: (np.asarray(v) if k == "hidden" else v) for k, v in model.config.items()}
    params = {
        "mapped": True,
        "model": model.kind,
        **config,
        "likelihood": likelihood,
        "layer": "X" if layer is None else layer,
        **(
            {
                "batch_key": key,
                "reference_batch_categories": list(model.batch_categories),
                "new_batch_categories": new,
                "batch_categories": list(extended.batch_categories),
            }
            if first
            else {}
        ),
        "n_genes": model.n_genes,
        "n_genes_missing": n_missing,
        "n_genes_dropped": n_dropped,
        "epochs": 0 if result is None else result.epochs,
        "batch_size": schedule.batch_size,
        "n_steps": 0 if result is None else result.steps,
        "epochs_auto": result is not None and schedule.epochs_auto,
        "lr": lr,
        "random_state": random_state,
        "device": str(dev),
        "n_obs": int(X.shape[0]),
        "backed": backed,
    }
    record = {
        "params": params,
        "history": {} if result is None else result.history,
        "training_time_s": 0.0 if result is None else result.seconds,
    }

    target = query.to_memory() if copy and query.isbacked else query.copy() if copy else query
    obsm_key = key_added or f"X_{model.kind}"
    target.obsm[obsm_key] = rep
    if spike is not None:
        target.obsm[f"{obsm_key}_spike"] = spike
    target.uns[key_added or model.kind] = record

    if copy and return_model:
        return target, extended
    if copy:
        return target
    if return_model:
        return extended
    return None


def _representation(adata: AnnData, use_rep: Any, name: str) -> np.ndarray:
    if not isinstance(use_rep, str) or use_rep not in adata.obsm:
        present = ", ".join(repr(k) for k in adata.obsm) or "none"
        raise KeyError(
            f"use_rep={use_rep!r} is not in {name}.obsm (present: {present}). Map the query "
            "first (`sv.tl.map_query`) and pass the key it wrote, e.g. 'X_vae'."
        )
    rep = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    if rep.ndim != 2 or not np.isfinite(rep).all():
        raise ValueError(f"{name}.obsm[{use_rep!r}] must be a finite 2-D array.")
    return rep


def transfer_labels(
    reference: AnnData,
    query: AnnData,
    labels_key: str,
    *,
    use_rep: str,
    n_neighbors: int = 15,
    key_added: str | None = None,
    unknown_threshold: float = 0.5,
) -> None:
    r"""Carry labels from reference cells to query cells by a weighted kNN vote (scArches).

    Each query cell's ``n_neighbors`` nearest reference cells in ``use_rep`` (Euclidean,
    :class:`sklearn.neighbors.NearestNeighbors`) vote with weights from a Gaussian-type
    kernel of their distances, as scArches' ``weighted_knn_transfer``: for a cell whose
    neighbours lie at distances :math:`d_j` with standard deviation :math:`s`,
    :math:`w_j \propto \exp(-d_j s^2 / 4)`, normalised to sum to 1 (equal weights when all
    distances are equal). The predicted label is the one with the largest summed weight, and
    the uncertainty is one minus that share.

    Parameters
    ----------
    reference
        Annotated reference cells, shape ``(n_ref, n_vars)``, with ``obs[labels_key]`` and
        ``obsm[use_rep]``.
    query
        Annotated query cells, shape ``(n_query, n_vars)``, with ``obsm[use_rep]`` in the same
        space (from :func:`map_query`).
    labels_key
        Column of ``reference.obs`` with the labels; every reference cell needs one.
    use_rep
        Key of the representation in both ``obsm`` (e.g. ``"X_vae"``), same width.
    n_neighbors
        Reference neighbours per query cell (15), at most ``n_ref``.
    key_added
        Name of the prediction column; default ``f"{labels_key}_pred"``. The uncertainty goes
        to ``f"{labels_key}_uncertainty"`` (``f"{key_added}_uncertainty"`` with ``key_added``).
    unknown_threshold
        In ``[0, 1]``. Cells whose uncertainty exceeds it are labelled ``"Unknown"``. The
        default 0.5 keeps a label only when it holds a weighted majority of the neighbours
        (a tie of two labels, 0.5 each, keeps it); 1 never says ``"Unknown"``. This flags
        cells whose neighbours disagree, such as a population that the reference lacks and
        that falls between reference populations; a population far from all reference cells
        but nearest to one population gets that population's label with low uncertainty.

    Returns
    -------
    None. Sets ``query.obs[f"{labels_key}_pred"]`` (categorical: the reference's labels and
    ``"Unknown"``) and ``query.obs[f"{labels_key}_uncertainty"]`` (float in ``[0, 1]``).

    Raises
    ------
    KeyError
        ``labels_key`` not in ``reference.obs``, ``use_rep`` not in either ``obsm``.
    ValueError
        Missing labels, representations of different widths or with NaN, ``n_neighbors`` above
        ``n_ref``, ``unknown_threshold`` outside ``[0, 1]``, an empty reference or query.
    """
    from sklearn.neighbors import NearestNeighbors

    for adata, name in ((reference, "reference"), (query, "query")):
        if not isinstance(adata, AnnData) or adata.n_obs == 0:
            raise ValueError(f"`{name}` must be an AnnData with at least one cell.")
    labels = obs_column(reference, labels_key, argument="labels_key", what="label")
    ref_rep = _representation(reference, use_rep, "reference")
    query_rep = _representation(query, use_rep, "query")
    if ref_rep.shape[1] != query_rep.shape[1]:
        raise ValueError(
            f"reference.obsm[{use_rep!r}] has {ref_rep.shape[1]} dimensions, the query's "
            f"{query_rep.shape[1]}: they must come from the same model."
        )
    n_neighbors = check_int("n_neighbors", n_neighbors)
    if n_neighbors > reference.n_obs:
        raise ValueError(
            f"`n_neighbors` ({n_neighbors}) is more than the {reference.n_obs} reference cells."
        )
    unknown_threshold = check_float(
        "unknown_threshold", unknown_threshold, low=0.0, high=1.0, open_low=False
    )
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        raise ValueError(f"`key_added` must be a non-empty string or None, got {key_added!r}.")

    distances, neighbours = (
        NearestNeighbors(n_neighbors=n_neighbors).fit(ref_rep).kneighbors(query_rep)
    )
    spread = distances.std(axis=1, keepdims=True)
    weights = np.exp(-distances * spread**2 / 4.0)
    weights /= weights.sum(axis=1, keepdims=True)

    column = reference.obs[labels_key]
    order = (
        [str(c) for c in column.cat.categories]
        if isinstance(column.dtype, pd.CategoricalDtype)
        else sorted(set(labels))
    )
    codes = pd.Index(order).get_indexer(labels)[neighbours]  # (n_query, n_neighbors)
    votes = np.zeros((query.n_obs, len(order)))
    np.add.at(votes, (np.arange(query.n_obs)[:, None], codes), weights)
    best = votes.argmax(axis=1)
    uncertainty = np.clip(1.0 - votes.max(axis=1), 0.0, 1.0)
    predicted = np.asarray(order, dtype=object)[best]
    predicted[uncertainty > unknown_threshold] = UNKNOWN
    categories = [*order, UNKNOWN] if UNKNOWN not in order else order

    pred_key = key_added or f"{labels_key}_pred"
    query.obs[pred_key] = pd.Categorical(predicted, categories=categories)
    query.obs[f"{key_added or labels_key}_uncertainty"] = uncertainty
