"""``sv.tl.normalized_expression``, ``sv.tl.rank_genes_groups`` and ``sv.tl.gene_programs``.

Each takes an AnnData and a fitted :class:`~scvae_tools.models.LatentModel`, computes
everything first (so an error leaves the AnnData as it was) and then writes its result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._checks import check_int
from .._data import check_anndata, obs_column
from ..models._expression import (
    activity,
    default_pseudocount,
    fdr_de_prediction,
    gene_indices,
    gene_loadings,
)
from ..models._likelihood import LIKELIHOODS
from ..models._model import LatentModel

__all__ = ["MAX_LAYER_BYTES", "gene_programs", "normalized_expression", "rank_genes_groups"]

#: Largest layer :func:`normalized_expression` writes by default: 4 GiB (float32 values).
MAX_LAYER_BYTES = 4 * 1024**3


def _check_model(model: Any, adata: AnnData) -> LatentModel:
    check_anndata(adata)
    if not isinstance(model, LatentModel):
        raise TypeError(
            "`model` must be a fitted LatentModel (from sv.tl.vae(..., return_model=True) or "
            f"sv.models.load), got {type(model).__name__}."
        )
    return model


def _check_key(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
    return value


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 1024**3:.2f} GiB"


def normalized_expression(
    adata: AnnData,
    model: LatentModel,
    *,
    layer_added: str = "scvae_normalized",
    layer: str | None = None,
    batch_key: str | None = None,
    transform_batch: str | Sequence[str] | None = None,
    library_size: float = 1.0,
    genes: Sequence[str] | None = None,
    batch_size: int = 1024,
    max_bytes: int = MAX_LAYER_BYTES,
    copy: bool = False,
) -> AnnData | None:
    """Write the model's normalised expression of every cell as a layer.

    Computes :meth:`~scvae_tools.models.LatentModel.normalized_expression` (see it for the scale:
    proportions times ``library_size`` for count likelihoods, the log-scale reconstruction for the
    Gaussian) and stores it in ``adata.layers[layer_added]``.

    Parameters
    ----------
    adata
        Annotated data matrix of shape ``(n_obs, n_vars)`` with the model's genes in its
        order, holding what the model was trained on.
    model
        The fitted model.
    layer_added
        Name of the layer written (default ``"scvae_normalized"``).
    layer, batch_key, transform_batch, library_size, batch_size
        As in :meth:`~scvae_tools.models.LatentModel.normalized_expression`.
    genes
        Compute only these genes: the layer is then a CSR matrix that stores their columns
        only (the others are empty, i.e. not computed, not zero expression). None: all genes,
        a dense float32 layer.
    max_bytes
        Largest layer written, in bytes (default ``MAX_LAYER_BYTES``, 4 GiB). The size is
        estimated before anything is computed (4 bytes per value dense, 8 per stored value
        sparse); a larger one raises, naming the size, instead of filling the memory.
    copy
        Work on a copy of ``adata`` and return it.

    Returns
    -------
    None, or the copy with ``copy=True``. Sets ``adata.layers[layer_added]``, float32
    ``(n_obs, n_vars)``, and ``adata.uns[layer_added]``: ``params`` (the model's kind and
    likelihood, ``library_size``, ``transform_batch``, ``genes``, the ``scale``:
    ``"proportions x library_size"`` or ``"log (input scale)"``).

    Raises
    ------
    ValueError
        The layer would exceed ``max_bytes`` (pass ``genes=`` to compute fewer), or what
        :meth:`~scvae_tools.models.LatentModel.normalized_expression` raises.
    """
    model = _check_model(model, adata)
    layer_added = _check_key("layer_added", layer_added)
    max_bytes = check_int("max_bytes", max_bytes)
    columns = gene_indices(model, genes)
    n_cols = model.n_genes if columns is None else len(columns)
    size = adata.n_obs * n_cols * (4 if columns is None else 8)
    if size > max_bytes:
        raise ValueError(
            f"The layer would take {_gib(size)} ({adata.n_obs} cells x {n_cols} genes), more "
            f"than max_bytes={_gib(max_bytes)}. Pass genes= (the genes you need; the layer then "
            "stores only those), subset the cells, or raise max_bytes."
        )
    values = model.normalized_expression(
        adata,
        layer=layer,
        batch_key=batch_key,
        transform_batch=transform_batch,
        library_size=library_size,
        genes=genes,
        batch_size=batch_size,
    )
    if columns is not None:
        n = adata.n_obs
        values = sp.csr_matrix(
            (
                values.ravel(),
                np.tile(np.asarray(columns, dtype=np.int32), n),
                np.arange(n + 1, dtype=np.int64) * len(columns),
            ),
            shape=(n, model.n_genes),
        )
        values.sort_indices()
    counts = LIKELIHOODS[model.likelihood].counts
    params = {
        "model": model.kind,
        "likelihood": model.likelihood,
        "scale": "proportions x library_size" if counts else "log (input scale)",
        "library_size": float(library_size),
        "transform_batch": (
            "own" if transform_batch is None else np.asarray([transform_batch]).ravel().tolist()
        ),
        "genes": "all" if genes is None else [str(g) for g in np.atleast_1d(genes)],
        "layer": "X" if layer is None else layer,
    }
    target = (adata.to_memory() if adata.isbacked else adata.copy()) if copy else adata
    target.layers[layer_added] = values
    target.uns[layer_added] = {"params": params}
    return target if copy else None


def _recarray(columns: dict[str, np.ndarray], dtype: str) -> np.recarray:
    return np.rec.fromarrays(list(columns.values()), dtype=[(g, dtype) for g in columns])


def rank_genes_groups(
    adata: AnnData,
    model: LatentModel,
    groupby: str,
    *,
    groups: str | Sequence[str] = "all",
    key_added: str = "rank_genes_groups",
    layer: str | None = None,
    batch_key: str | None = None,
    transform_batch: str | Sequence[str] | None = None,
    delta: float = 0.25,
    fdr_target: float = 0.05,
    n_samples: int = 100,
    max_cells: int = 1000,
    pseudocount: float | None = None,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Rank genes of each group against the rest with the model, in scanpy's format.

    Runs :meth:`~scvae_tools.models.LatentModel.differential_expression` for each group against all
    other cells and writes ``adata.uns[key_added]`` in the structure of
    :func:`scanpy.tl.rank_genes_groups`, so that :func:`scanpy.get.rank_genes_groups_df` and
    ``sc.pl.rank_genes_groups_*`` (dot plots, matrix plots...) read it unchanged.

    Parameters
    ----------
    adata
        Annotated data matrix with the model's genes in its order.
    model
        The fitted model.
    groupby
        Categorical ``obs`` column of the groups.
    groups
        The groups to rank (each against all other cells); ``"all"``: every group.
    key_added
        ``uns`` key written (default ``"rank_genes_groups"``, scanpy's).
    layer, batch_key, transform_batch, delta, fdr_target, n_samples, max_cells, pseudocount
        As in :meth:`~scvae_tools.models.LatentModel.differential_expression`.
    random_state
        Seed; group ``i`` (in order) uses ``random_state + i``.
    copy
        Work on a copy of ``adata`` and return it.

    Returns
    -------
    None, or the copy with ``copy=True``. Sets ``adata.uns[key_added]``, each per-gene field a
    structured array with one field per group, genes in ranked order:

    ``names``
        Gene names, ranked by ``scores`` (ties by ``logfoldchanges``, descending).
    ``scores``
        ``sign(lfc_mean) * prob_de``: genes up in the group first, down last.
    ``logfoldchanges``
        ``lfc_mean``, log2 fold change of the group's mean normalised expression over the
        rest's.
    ``pvals``
        ``1 - prob_de``: the posterior probability of no change (``|LFC| <= delta``), not a
        frequentist p-value.
    ``pvals_adj``
        The posterior expected FDR of the genes ranked up to this one by ``prob_de`` (genes
        with ``pvals_adj <= fdr_target`` are those
        :meth:`~scvae_tools.models.LatentModel.differential_expression` calls ``is_de``).
    ``pts``, ``pts_rest``
        DataFrames (genes x groups): fraction of cells of the group, and of the rest, with a
        non-zero value in the data.
    ``params``
        ``groupby``, ``reference`` (``"rest"``), ``method`` (``"scvae_tools.<kind>"``),
        ``use_raw`` (False), ``layer``, ``corr_method`` and the arguments above
        (``pseudocount``: the value used, also where it was left to its default).

    Raises
    ------
    ValueError, KeyError
        As :meth:`~scvae_tools.models.LatentModel.differential_expression`, or an unknown group in
        ``groups``.
    """
    model = _check_model(model, adata)
    key_added = _check_key("key_added", key_added)
    random_state = check_int("random_state", random_state, minimum=0)
    values = obs_column(adata, groupby, argument="groupby", what="group", allow_missing=True)
    present = list(
        adata.obs[groupby].cat.categories.astype(str)
        if isinstance(adata.obs[groupby].dtype, pd.CategoricalDtype)
        else sorted(set(values))
    )
    present = [g for g in present if g in set(values)]
    if isinstance(groups, str) and groups == "all":
        chosen = present
    else:
        chosen = [groups] if isinstance(groups, str) else [str(g) for g in groups]
        unknown = [g for g in chosen if g not in present]
        if unknown or not chosen:
            raise ValueError(
                f"`groups` has unknown group(s) {unknown or chosen} (groups: {present})."
            )
    if len(present) < 2:
        raise ValueError(f"adata.obs[{groupby!r}] has a single group; nothing to rank against.")
    if pseudocount is None:
        # Every group is compared with the rest, so all share the default (all cells').
        pseudocount = default_pseudocount(model, model._matrix(adata, layer))
    fields: dict[str, dict[str, np.ndarray]] = {
        k: {} for k in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj")
    }
    pts, pts_rest = {}, {}
    for i, group in enumerate(chosen):
        df = model.differential_expression(
            adata,
            groupby,
            group,
            layer=layer,
            batch_key=batch_key,
            transform_batch=transform_batch,
            delta=delta,
            fdr_target=fdr_target,
            n_samples=n_samples,
            max_cells=max_cells,
            pseudocount=pseudocount,
            random_state=random_state + i,
        )
        lfc = df["lfc_mean"].to_numpy()
        score = np.sign(lfc) * df["prob_de"].to_numpy()
        order = np.lexsort((-lfc, -score))
        fields["names"][group] = df.index.to_numpy()[order].astype(object)
        fields["scores"][group] = score[order].astype(np.float32)
        fields["logfoldchanges"][group] = lfc[order].astype(np.float32)
        fields["pvals"][group] = (1.0 - df["prob_de"].to_numpy())[order]
        _, fdr = fdr_de_prediction(df["prob_de"].to_numpy(), fdr_target)
        fields["pvals_adj"][group] = fdr[order]
        pts[group] = df["frac_expressing1"].to_numpy()
        pts_rest[group] = df["frac_expressing2"].to_numpy()
    record: dict[str, Any] = {
        "params": {
            "groupby": groupby,
            "reference": "rest",
            "method": f"scvae_tools.{model.kind}",
            "use_raw": False,
            "layer": layer,
            "corr_method": "posterior expected FDR",
            "delta": float(delta),
            "fdr_target": float(fdr_target),
            "n_samples": int(n_samples),
            "max_cells": int(max_cells),
            "pseudocount": float(pseudocount),
            "random_state": random_state,
        },
        "names": _recarray(fields["names"], "O"),
        "scores": _recarray(fields["scores"], "float32"),
        "logfoldchanges": _recarray(fields["logfoldchanges"], "float32"),
        "pvals": _recarray(fields["pvals"], "float64"),
        "pvals_adj": _recarray(fields["pvals_adj"], "float64"),
        "pts": pd.DataFrame(pts, index=model.var_names),
        "pts_rest": pd.DataFrame(pts_rest, index=model.var_names),
    }
    if transform_batch is not None:
        record["params"]["transform_batch"] = np.asarray([transform_batch]).ravel().tolist()
    target = (adata.to_memory() if adata.isbacked else adata.copy()) if copy else adata
    target.uns[key_added] = record
    return target if copy else None


def gene_programs(
    adata: AnnData,
    model: LatentModel,
    *,
    groupby: str | None = None,
    n_top: int = 20,
    key_added: str | None = None,
    layer: str | None = None,
    batch_key: str | None = None,
    batch_size: int = 1024,
    copy: bool = False,
) -> AnnData | None:
    r"""The genes each latent dimension moves: loadings, top genes, how often it is active.

    The loading of gene :math:`g` on dimension :math:`k` is :math:`\partial \eta_g / \partial
    z_k`, where :math:`\eta` is the decoder's output layer: the log-scale reconstruction
    (Gaussian) or the logits of the proportions (count likelihoods; log-proportions up to a
    per-cell constant, so a loading is a log fold change per unit of :math:`z_k`, shared by all
    genes up to that constant).

    * ``decoder="linear"``: :math:`\eta` is linear in :math:`z`, and the loadings are exactly
      the output layer's weights on the code (scvi-tools' LDVAE ``get_loadings``).
    * ``decoder="mlp"``: the Jacobian, by forward-mode differentiation, at each cell's
      posterior mean, averaged over the cells of ``adata``. A finite difference would need a
      step: too small, it is the Jacobian again; a large one leaves the region of codes the
      cells occupy. The ReLU decoder's Jacobian is piecewise constant, and averaging it over
      the cells' own codes weighs each region by how many cells are there. Measured on a
      synthetic set of three count programs (NB VAE and VSC, MLP decoder, 60 epochs), the
      averaged Jacobian correlated at 0.99-1.00 per dimension with central differences of 0.01
      and of 1 standard deviation of each dimension, with the same top-10 genes (29-30 of 30):
      the step does not matter there, and the Jacobian needs none. For the count likelihoods
      each dimension's loadings are centred on their median over genes (the softmax ignores a
      constant shared by all genes).

    Parameters
    ----------
    adata
        Annotated data matrix with the model's genes in its order (what it was trained on).
    model
        The fitted model.
    groupby
        ``obs`` column: with a VSC, also the mean spike probability of each dimension per
        group.
    n_top
        Genes listed per dimension, by absolute loading (default 20).
    key_added
        ``varm`` and ``uns`` key written; default ``"{kind}_programs"`` (e.g.
        ``"vsc_programs"``).
    layer, batch_key, batch_size
        As in :meth:`~scvae_tools.models.LatentModel.normalized_expression` (cells are decoded with
        their own batches).
    copy
        Work on a copy of ``adata`` and return it.

    Returns
    -------
    None, or the copy with ``copy=True``. Sets:

    ``adata.varm[key]`` : float32 ``(n_vars, n_latent)``
        The loadings.
    ``adata.uns[key]`` : dict
        ``top_genes`` (DataFrame ``n_top x n_latent``, column ``str(k)``: the genes with the
        largest absolute loading on dimension ``k``, largest first), ``active_share``
        (``(n_latent,)``: share of cells in which the dimension is active: spike probability
        above 0.5 for the VSC; posterior mean more than 1.96 posterior standard deviations
        from 0 for the VAE; NaN for the AE, which has no posterior), with ``groupby`` and a VSC
        ``spike_by_group`` (DataFrame groups x dimensions), and ``params`` (``method``:
        ``"weights"`` or ``"jacobian"``, ``n_top``, the model's ``kind``, ``likelihood``,
        ``decoder``, ``groupby``).

    Raises
    ------
    ValueError, KeyError
        Genes differ from the model's, a missing batch or ``groupby`` column, bad ``n_top``.
    """
    model = _check_model(model, adata)
    n_top = min(check_int("n_top", n_top), model.n_genes)
    key = _check_key("key_added", key_added) if key_added is not None else f"{model.kind}_programs"
    groups = None
    if groupby is not None:
        groups = obs_column(adata, groupby, argument="groupby", what="group", allow_missing=True)
    loadings, method = gene_loadings(
        model, adata, layer=layer, batch_key=batch_key, batch_size=batch_size
    )
    active = activity(model, adata, layer=layer, batch_key=batch_key, batch_size=batch_size)
    share = (np.full(model.n_latent, np.nan) if active is None else (active > 0.5).mean(0)).astype(
        np.float64
    )
    names = np.asarray(model.var_names, dtype=object)
    top = np.argsort(-np.abs(loadings), axis=0, kind="stable")[:n_top]
    record: dict[str, Any] = {
        "params": {
            "method": method,
            "n_top": n_top,
            "model": model.kind,
            "likelihood": model.likelihood,
            "decoder": model.config.get("decoder", "mlp"),
            **({"groupby": groupby} if groupby is not None else {}),
        },
        "top_genes": pd.DataFrame({str(k): names[top[:, k]] for k in range(model.n_latent)}),
        "active_share": share,
    }
    if groups is not None and model.kind == "vsc":
        frame = pd.DataFrame(active, columns=[str(k) for k in range(model.n_latent)])
        record["spike_by_group"] = frame.groupby(groups, sort=True).mean()
    target = (adata.to_memory() if adata.isbacked else adata.copy()) if copy else adata
    target.varm[key] = loadings.astype(np.float32)
    target.uns[key] = record
    return target if copy else None
