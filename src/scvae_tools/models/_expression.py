"""What a fitted decoder says about genes: expression, differential expression, programs.

Normalised expression, differential expression between groups of cells, and the genes each
latent dimension moves. Everything here reads cells through the one data path
(:class:`~scvae_tools._data.MinibatchLoader`), a block of cells at a time, encodes them with
the posterior mean (or draws from the posterior, for differential expression) and decodes them
with their own batches or with those asked for (``transform_batch``).
:class:`~scvae_tools.models.LatentModel` exposes these as methods; the ``sv.tl`` tools write
their results into an AnnData.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .._checks import check_float, check_int
from .._data import (
    MinibatchLoader,
    batch_covariates,
    check_anndata,
    iter_row_blocks,
    obs_column,
)
from ._latent import LatentOutput
from ._likelihood import LIKELIHOODS

if TYPE_CHECKING:
    from ._model import LatentModel

__all__ = [
    "DE_SCALE",
    "activity",
    "differential_expression",
    "fdr_de_prediction",
    "gene_loadings",
    "normalized_expression",
]

#: Scale of the expression that differential expression compares: counts per 10,000.
DE_SCALE = 1e4


@dataclass
class _Cells:
    """Cells to decode: their matrix, their own one-hot batches, and the batches to decode as.

    ``own``: ``(n_cells, n_batches)`` one-hot, or None when the model has no batches or the
    cells' batches are not needed (nor known). ``targets``: the batch indices to decode every
    cell as, averaged over; ``[None]`` decodes each cell with its own batch (or none).
    """

    X: Any
    own: np.ndarray | None
    targets: list[int | None]


def _check_transform_batch(model: LatentModel, transform_batch: Any) -> list[int | None]:
    if transform_batch is None:
        return [None]
    if not model.batch_categories:
        raise ValueError(
            f"transform_batch={transform_batch!r}, but this model was trained without a "
            "batch_key: it has no batches to decode as. Leave transform_batch=None."
        )
    names = [transform_batch] if isinstance(transform_batch, str) else transform_batch
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(
            "`transform_batch` must be a batch name or a non-empty list of batch names, got "
            f"{transform_batch!r}."
        )
    unknown = [n for n in names if n not in model.batch_categories]
    if unknown:
        raise ValueError(
            f"transform_batch has batch(es) the model was not trained on: {unknown} (known: "
            f"{model.batch_categories})."
        )
    return [model.batch_categories.index(n) for n in dict.fromkeys(names)]


def _require_log1p(X: Any) -> None:
    """A Gaussian model's DE goes back from ``log1p`` values: refuse negative (scaled) input."""
    block = X[: min(X.shape[0], 10_000)]
    block = block.to_memory() if hasattr(block, "to_memory") else block
    values = block.data if sp.issparse(block) else np.asarray(block)
    if values.size and float(values.min()) < 0:
        raise ValueError(
            "Differential expression with a Gaussian model reads its output as log1p of "
            "normalised expression, but this input has negative values (scaled data?), so "
            "fold changes would mean nothing. Train and call the model on log-normalised "
            "values (layer=...), or use a count likelihood on the counts."
        )


def prepare_cells(
    model: LatentModel,
    adata: AnnData,
    *,
    layer: str | None,
    batch_key: str | None,
    transform_batch: str | Sequence[str] | None,
) -> _Cells:
    """Check an AnnData against the model and collect what decoding its cells needs.

    The cells' own batches are read from ``obs[batch_key or model.batch_key]`` when the decoder
    needs them (no ``transform_batch``) or the encoder does (``encode_covariates=True``); a
    missing column is a KeyError naming the argument.
    """
    check_anndata(adata)
    targets = _check_transform_batch(model, transform_batch)
    X = model._checked_matrix(adata, layer)
    own = None
    if model.batch_categories:
        needs_own = targets == [None] or model.module.input_covariates is not None
        key = batch_key or model.batch_key
        if needs_own:
            if key not in adata.obs.columns:
                raise KeyError(
                    f"This model decodes each cell with its batch, read from adata.obs[{key!r}]"
                    ", which is missing. Pass batch_key= (the column holding each cell's "
                    "batch), or transform_batch= to decode every cell as one batch"
                    + (
                        "."
                        if model.module.input_covariates is None
                        else " (its encoder sees the batch too, so the column is needed)."
                    )
                )
            own, _ = batch_covariates(adata, key, model.batch_categories)
    return _Cells(X, own, targets)


def _decode(
    model: LatentModel,
    z: torch.Tensor,
    own: torch.Tensor | None,
    targets: list[int | None],
    scale: str,
) -> torch.Tensor:
    """Decoded expression of codes ``z`` ``(n, n_latent)``, averaged over the ``targets``.

    ``scale``: ``"proportions"`` (softmax of the logits; count likelihoods), ``"log"`` (the
    output layer itself; Gaussian) or ``"linear"`` (``expm1`` of the Gaussian's output clipped
    at 0: back from ``log1p`` to the scale of the normalised data, e.g. counts per 10,000).
    """
    module = model.module
    total = None
    for target in targets:
        covariates = own
        if target is not None:
            covariates = z.new_zeros(z.shape[0], len(model.batch_categories))
            covariates[:, target] = 1.0
        logits = module.decoder_logits(z, covariates)
        if scale == "proportions":
            out = torch.softmax(logits, dim=-1)
        elif scale == "log":
            out = logits
        else:
            out = torch.expm1(logits.clamp(min=0.0))
        total = out if total is None else total + out
    return total / len(targets)


def _blocks(
    model: LatentModel, cells: _Cells, batch_size: int
) -> Iterator[tuple[LatentOutput, torch.Tensor | None]]:
    """Each block of cells encoded (evaluation mode), with its own one-hot batches."""
    loader = MinibatchLoader(cells.X, batch_size, device=model.device, covariates=cells.own)
    for batch in loader.sequential(batch_size):
        yield model.module.encode(batch), batch.covariates


@torch.no_grad()
def normalized_expression(
    model: LatentModel,
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    transform_batch: str | Sequence[str] | None = None,
    library_size: float = 1.0,
    genes: Sequence[str] | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """See :meth:`LatentModel.normalized_expression`."""
    batch_size = check_int("batch_size", batch_size)
    counts = LIKELIHOODS[model.likelihood].counts
    library_size = check_float("library_size", library_size, low=0.0, open_low=True)
    if not counts and library_size != 1.0:
        raise ValueError(
            f"library_size={library_size:g} applies to count likelihoods only; this model's "
            f"likelihood is {model.likelihood!r}, whose decoder gives the reconstruction on "
            "its input's (log) scale. Leave library_size=1.0."
        )
    columns = gene_indices(model, genes)
    cells = prepare_cells(
        model, adata, layer=layer, batch_key=batch_key, transform_batch=transform_batch
    )
    scale = "proportions" if counts else "log"
    index = None if columns is None else torch.as_tensor(columns, device=model.device)
    out = [np.zeros((0, model.n_genes if columns is None else len(columns)), np.float32)]
    for latent, own in _blocks(model, cells, batch_size):
        values = _decode(model, latent.mean, own, cells.targets, scale)
        if index is not None:
            values = values.index_select(1, index)
        if counts:
            values = values * library_size
        out.append(values.float().cpu().numpy())
    return np.concatenate(out)


def gene_indices(model: LatentModel, genes: Sequence[str] | str | None) -> np.ndarray | None:
    """Positions of ``genes`` among the model's genes (None for all); unknown ones raise."""
    if genes is None:
        return None
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("`genes` is empty; pass None for all genes.")
    positions = pd.Index(model.var_names).get_indexer(genes)
    if (positions < 0).any():
        unknown = [g for g, p in zip(genes, positions, strict=True) if p < 0]
        raise ValueError(
            f"{len(unknown)} gene(s) in `genes` are not among the model's {model.n_genes} "
            f"genes: {unknown[:10]}."
        )
    return positions


def _group_mask(values: np.ndarray, group: str | Sequence[str], name: str) -> np.ndarray:
    wanted = [group] if isinstance(group, str) else [str(g) for g in group]
    present = sorted(set(values))
    unknown = [g for g in wanted if g not in set(present)]
    if unknown or not wanted:
        raise ValueError(
            f"`{name}` has group(s) not found in the column: {unknown or wanted} (groups: "
            f"{present[:20]})."
        )
    return np.isin(values, wanted)


def fdr_de_prediction(prob_de: np.ndarray, fdr_target: float) -> tuple[np.ndarray, np.ndarray]:
    """Posterior expected FDR control, as scvi-tools' ``"change"`` mode.

    Genes sorted by ``prob_de`` (descending); the expected false discovery proportion of the
    first ``k`` is the mean of ``1 - prob_de`` over them. The largest set whose expected FDR is
    at most ``fdr_target`` is called.

    Parameters
    ----------
    prob_de
        Posterior probability of differential expression per gene, shape ``(n_genes,)``.
    fdr_target
        Highest expected FDR of the called set.

    Returns
    -------
    ``is_de`` (bool, ``(n_genes,)``) and each gene's expected FDR of the set up to and including
    it in that order (``(n_genes,)``; a q-value analogue).
    """
    prob_de = np.asarray(prob_de, dtype=np.float64)
    order = np.argsort(-prob_de, kind="stable")
    running = np.cumsum(1.0 - prob_de[order]) / np.arange(1, len(order) + 1)
    n_called = int((running <= fdr_target).sum())  # running is non-decreasing
    is_de = np.zeros(len(prob_de), dtype=bool)
    is_de[order[:n_called]] = True
    fdr = np.empty(len(prob_de))
    fdr[order] = running
    return is_de, fdr


def _fraction_expressing(X: Any, rows: np.ndarray) -> np.ndarray:
    """Fraction of the cells ``rows`` (sorted) with a non-zero value, per gene."""
    hits = np.zeros(X.shape[1], dtype=np.int64)
    wanted = np.zeros(X.shape[0], dtype=bool)
    wanted[rows] = True
    start = 0
    for block in iter_row_blocks(X):
        stop = start + block.shape[0]
        keep = wanted[start:stop]
        if keep.any():
            part = block[keep]
            hits += (
                np.asarray((part != 0).sum(0)).ravel()
                if sp.issparse(part)
                else (np.count_nonzero(np.asarray(part), axis=0))
            )
        start = stop
    return hits / max(len(rows), 1)


def default_pseudocount(model: LatentModel, X: Any) -> float:
    """One count in the median cell, on the scale that differential expression compares.

    Count likelihoods: ``DE_SCALE`` over the median total count of the cells of ``X`` (counts
    per 10,000). A smaller one lets genes barely detected in either group reach large, noisy
    fold changes. Gaussian: 1, the pseudocount of the ``log1p`` its input went through.
    """
    if not LIKELIHOODS[model.likelihood].counts:
        return 1.0
    totals = [np.asarray(block.sum(1)).ravel() for block in iter_row_blocks(X)]
    median = float(np.median(np.concatenate(totals))) if totals else 0.0
    return DE_SCALE / max(median, 1.0)


@dataclass
class _Posterior:
    """The encoded posterior of some cells, on the CPU: what :meth:`draw` needs."""

    out: LatentOutput
    own: torch.Tensor | None

    def take(self, idx: torch.Tensor) -> tuple[LatentOutput, torch.Tensor | None]:
        out = self.out
        sub = LatentOutput(
            z=out.z[idx], mean=out.mean[idx], extras={k: v[idx] for k, v in out.extras.items()}
        )
        return sub, None if self.own is None else self.own[idx]


def _encode_posterior(model: LatentModel, cells: _Cells, batch_size: int) -> _Posterior:
    means, owns, extras = [], [], {}
    for latent, own in _blocks(model, cells, batch_size):
        means.append(latent.mean)
        if own is not None:
            owns.append(own)
        for k, v in latent.extras.items():
            extras.setdefault(k, []).append(v)
    mean = torch.cat(means)
    out = LatentOutput(z=mean, mean=mean, extras={k: torch.cat(v) for k, v in extras.items()})
    return _Posterior(out, torch.cat(owns).to(model.device) if owns else None)


@torch.no_grad()
def differential_expression(
    model: LatentModel,
    adata: AnnData,
    groupby: str,
    group1: str | Sequence[str],
    group2: str | Sequence[str] | None = None,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    transform_batch: str | Sequence[str] | None = None,
    delta: float = 0.25,
    fdr_target: float = 0.05,
    n_samples: int = 100,
    max_cells: int = 1000,
    pseudocount: float | None = None,
    batch_size: int = 1024,
    random_state: int = 0,
) -> pd.DataFrame:
    """See :meth:`LatentModel.differential_expression`."""
    delta = check_float("delta", delta, low=0.0, open_low=False)
    fdr_target = check_float("fdr_target", fdr_target, low=0.0, high=1.0, open_low=False)
    n_samples = check_int("n_samples", n_samples, minimum=2)
    max_cells = check_int("max_cells", max_cells)
    if pseudocount is not None:
        pseudocount = check_float("pseudocount", pseudocount, low=0.0, open_low=False)
    batch_size = check_int("batch_size", batch_size)
    random_state = check_int("random_state", random_state, minimum=0)
    check_anndata(adata)
    values = obs_column(adata, groupby, argument="groupby", what="group", allow_missing=True)
    mask1 = _group_mask(values, group1, "group1")
    mask2 = ~mask1 if group2 is None else _group_mask(values, group2, "group2")
    if group2 is not None and (mask1 & mask2).any():
        raise ValueError("group1 and group2 share groups; they must be disjoint.")
    if not mask2.any():
        raise ValueError(f"No cells outside group1={group1!r} to compare it with.")
    rows1, rows2 = np.flatnonzero(mask1), np.flatnonzero(mask2)
    rows = np.concatenate([rows1, rows2])
    order = np.argsort(rows)
    # A view's X is a copy of its rows: with every cell in the comparison (group1 against the
    # rest) use the AnnData itself, so that a 1.5 GB matrix is not held twice.
    sub = adata if len(rows) == adata.n_obs else adata[np.sort(rows)]
    cells = prepare_cells(
        model, sub, layer=layer, batch_key=batch_key, transform_batch=transform_batch
    )
    posterior = _encode_posterior(model, cells, batch_size)
    # Positions of each group's cells among the sorted rows of ``sub``.
    where = np.empty(len(rows), dtype=np.int64)
    where[order] = np.arange(len(rows))
    pos1, pos2 = where[: len(rows1)], where[len(rows1) :]

    scale = "proportions" if LIKELIHOODS[model.likelihood].counts else "linear"
    if scale == "linear":
        _require_log1p(cells.X)
    factor = DE_SCALE if scale == "proportions" else 1.0
    if pseudocount is None:
        pseudocount = default_pseudocount(model, cells.X)
    rng = np.random.default_rng(random_state)
    generator = torch.Generator(device=model.device).manual_seed(random_state)

    def group_mean(positions: np.ndarray) -> torch.Tensor:
        picked = rng.choice(positions, size=min(len(positions), max_cells), replace=True)
        total = None
        for i in range(0, len(picked), batch_size):
            idx = torch.as_tensor(picked[i : i + batch_size], device=model.device)
            latent, own = posterior.take(idx)
            z = model.module.draw(latent, generator)
            part = _decode(model, z, own, cells.targets, scale).sum(0)
            total = part if total is None else total + part
        return total * (factor / len(picked))

    means1 = torch.stack([group_mean(pos1) for _ in range(n_samples)]).double().cpu().numpy()
    means2 = torch.stack([group_mean(pos2) for _ in range(n_samples)]).double().cpu().numpy()
    lfc = np.log2(means1 + pseudocount) - np.log2(means2 + pseudocount)
    prob_de = (np.abs(lfc) > delta).mean(0)
    is_de, fdr = fdr_de_prediction(prob_de, fdr_target)
    return pd.DataFrame(
        {
            "lfc_mean": lfc.mean(0),
            "lfc_std": lfc.std(0, ddof=1),
            "prob_de": prob_de,
            "is_de": is_de,
            "fdr": fdr,
            "norm_mean1": means1.mean(0),
            "norm_mean2": means2.mean(0),
            "frac_expressing1": _fraction_expressing(cells.X, np.sort(pos1)),
            "frac_expressing2": _fraction_expressing(cells.X, np.sort(pos2)),
        },
        index=pd.Index(model.var_names, name="gene"),
    )


def gene_loadings(
    model: LatentModel,
    adata: AnnData | None = None,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    batch_size: int = 1024,
) -> tuple[np.ndarray, str]:
    """How the decoder's log-scale output of each gene moves with each latent dimension.

    Returns the loadings, ``(n_genes, n_latent)`` float32, and how they were computed:
    ``"weights"`` (linear decoder: the output layer's code columns, exact; ``adata`` unused) or
    ``"jacobian"`` (the Jacobian of the output layer's value with respect to the code, averaged
    over the posterior means of the cells of ``adata``, each decoded with its own batch).

    For the count likelihoods the softmax ignores a constant added to every gene's logit, so
    each column is only defined up to a constant: it is centred on its median over genes (a
    loading is then the log fold change of a gene relative to the typical gene, per unit of
    the dimension).
    """
    if model.config.get("decoder", "mlp") == "linear":
        weight = model.module.likelihood.output_layer.weight[:, : model.n_latent]
        loadings, method = weight.detach().double().cpu().numpy(), "weights"
    else:
        if adata is None:
            raise ValueError(
                "An MLP decoder's loadings are measured on cells' codes: pass the AnnData."
            )
        loadings, method = _mean_jacobian(model, adata, layer, batch_key, batch_size), "jacobian"
    if LIKELIHOODS[model.likelihood].counts:
        loadings = loadings - np.median(loadings, axis=0, keepdims=True)
    return loadings.astype(np.float32), method


def _mean_jacobian(
    model: LatentModel, adata: AnnData, layer: str | None, batch_key: str | None, batch_size: int
) -> np.ndarray:
    """The decoder logits' Jacobian, by forward mode, averaged over the cells' posterior means."""
    batch_size = check_int("batch_size", batch_size)
    cells = prepare_cells(model, adata, layer=layer, batch_key=batch_key, transform_batch=None)
    total = torch.zeros(model.n_genes, model.n_latent, dtype=torch.float64, device=model.device)
    n_cells = 0
    module = model.module
    for latent, own in _blocks(model, cells, batch_size):
        z = latent.mean
        for k in range(model.n_latent):
            tangent = torch.zeros_like(z)
            tangent[:, k] = 1.0
            _, derivative = torch.func.jvp(
                lambda code: module.decoder_logits(code, own),  # noqa: B023
                (z,),
                (tangent,),
            )
            total[:, k] += derivative.detach().sum(0).double()
        n_cells += z.shape[0]
    return (total / max(n_cells, 1)).cpu().numpy()


@torch.no_grad()
def activity(
    model: LatentModel,
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    batch_size: int = 1024,
) -> np.ndarray | None:
    """How active each latent dimension is in each cell, ``(n_cells, n_latent)``, or None.

    VSC: the spike probability. VAE: 1 where the posterior mean lies more than 1.96 posterior
    standard deviations from 0 (the prior's mean), else 0. AE: None (no posterior).
    """
    if model.kind == "ae":
        return None
    batch_size = check_int("batch_size", batch_size)
    cells = prepare_cells(model, adata, layer=layer, batch_key=batch_key, transform_batch=None)
    out = [np.zeros((0, model.n_latent), np.float32)]
    for latent, _ in _blocks(model, cells, batch_size):
        if model.kind == "vsc":
            value = latent.extras["spike"]
        else:
            sigma = torch.exp(latent.extras["log_sigma"])
            value = (latent.mean.abs() > 1.96 * sigma).float()
        out.append(value.float().cpu().numpy())
    return np.concatenate(out)
