"""A fitted model: the torch module plus what is needed to encode new data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._data import MinibatchLoader, batch_covariates, get_matrix, is_backed, validate_matrix
from ._likelihood import LIKELIHOODS
from ._module import AutoencoderModule, LatentType

__all__ = ["MODEL_LATENT", "LatentModel", "ModelKind", "load"]

ModelKind = Literal["ae", "vae", "vsc"]
MODEL_LATENT: dict[str, LatentType] = {
    "ae": "deterministic",
    "vae": "gaussian",
    "vsc": "spike_slab",
}
_FORMAT_VERSION = 2


class LatentModel:
    """A trained deep AE, β-VAE or β-VSC, as returned by ``sv.tl.*(..., return_model=True)``.

    Parameters
    ----------
    kind
        ``"ae"``, ``"vae"`` or ``"vsc"``.
    var_names
        The genes the model was trained on, in order.
    config
        Keyword arguments of :class:`~scvae_tools.models.AutoencoderModule`
        (``n_latent``, ``hidden``, ``beta``, ``prior_spike``, ``first_activation``,
        ``kl_warmup``, ``likelihood``), except ``n_batches``.
    module
        The fitted module; a fresh one is built from ``config`` when None.
    batch_key
        The ``obs`` column of the batches the decoder is conditioned on; None for none.
    batch_categories
        The batches, in the order of the one-hot columns.
    """

    def __init__(
        self,
        kind: ModelKind,
        var_names: Sequence[str],
        config: dict[str, Any],
        module: AutoencoderModule | None = None,
        *,
        batch_key: str | None = None,
        batch_categories: Sequence[str] = (),
    ):
        self.kind: ModelKind = kind
        self.var_names = [str(v) for v in var_names]
        self.config = dict(config)
        self.batch_key = batch_key
        self.batch_categories = [str(c) for c in batch_categories]
        self.module = module or AutoencoderModule(
            len(self.var_names),
            MODEL_LATENT[kind],
            n_batches=len(self.batch_categories),
            **self.config,
        )

    def __repr__(self) -> str:
        batches = f", batch_key={self.batch_key!r}" if self.batch_key else ""
        return (
            f"LatentModel(kind={self.kind!r}, n_genes={self.n_genes}, "
            f"n_latent={self.n_latent}, hidden={tuple(self.config['hidden'])}, "
            f"likelihood={self.likelihood!r}{batches})"
        )

    @property
    def likelihood(self) -> str:
        """``"gaussian"``, ``"nb"``, ``"zinb"`` or ``"poisson"``."""
        return self.config.get("likelihood", "gaussian")

    @property
    def n_genes(self) -> int:
        """Number of input genes."""
        return len(self.var_names)

    @property
    def n_latent(self) -> int:
        """Number of latent dimensions."""
        return int(self.config["n_latent"])

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live."""
        return next(self.module.parameters()).device

    def _matrix(self, data: AnnData | Any, layer: str | None) -> Any:
        if isinstance(data, AnnData):
            X = get_matrix(data, layer)
            genes = [str(v) for v in data.var_names]
            if genes != self.var_names:
                missing = [g for g in self.var_names if g not in set(genes)]
                extra = [g for g in genes if g not in set(self.var_names)]
                detail = (
                    f"{len(missing)} training gene(s) missing (e.g. {missing[:3]}), "
                    f"{len(extra)} unknown gene(s) (e.g. {extra[:3]})"
                    if missing or extra
                    else "the same genes in a different order"
                )
                raise ValueError(
                    f"The AnnData's genes differ from the {self.n_genes} genes the model was "
                    f"trained on: {detail}. Subset and order it first: "
                    "`adata[:, model.var_names]`."
                )
            return X
        if len(data.shape) != 2 or data.shape[1] != self.n_genes:
            raise ValueError(
                f"Expected a matrix of shape (n_cells, {self.n_genes}) (the training genes), "
                f"got shape {data.shape}."
            )
        return data

    def _checked_matrix(self, data: AnnData | Any, layer: str | None) -> Any:
        """:meth:`_matrix`, with its values checked as the likelihood needs them."""
        X = self._matrix(data, layer)
        counts_for = self.likelihood if LIKELIHOODS[self.likelihood].counts else None
        # On-disk data is checked for NaN as the encoding reads it.
        validate_matrix(X, name="the input", counts_for=counts_for, first_block_only=is_backed(X))
        return X

    def encode(
        self,
        data: AnnData | Any,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        batch_size: int = 4096,
        return_spike: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The latent representation of cells.

        Parameters
        ----------
        data
            AnnData with the training genes in the training order, or a dense or sparse matrix of
            shape ``(n_cells, n_genes)``. For a count likelihood, raw counts (as in training).
        layer
            Layer of an AnnData to encode; None for ``X``.
        batch_key
            For a model trained with a ``batch_key``: the ``obs`` column of an AnnData that
            holds each cell's batch; None uses the model's own ``batch_key``. Every batch
            must be one the model was trained on. A matrix is encoded without batches, which
            only a model whose encoder does not see them (``encode_covariates=False``) can do.
        batch_size
            Cells encoded at a time.
        return_spike
            Also return the spike probabilities (VSC only).

        Returns
        -------
        The representation, float32 of shape ``(n_cells, n_latent)``: the code (AE), the posterior
        mean (VAE, VSC). With ``return_spike=True``, also the spike probabilities, same shape.
        """
        if return_spike and self.kind != "vsc":
            raise ValueError("`return_spike=True` needs a VSC model; this one is " + self.kind)
        X = self._checked_matrix(data, layer)
        covariates = None
        if self.batch_categories and isinstance(data, AnnData):
            covariates, _ = batch_covariates(
                data, batch_key or self.batch_key, self.batch_categories
            )
        elif self.module.input_covariates is not None:
            raise ValueError(
                "This model's encoder sees each cell's batch (encode_covariates=True): pass an "
                f"AnnData whose obs[{self.batch_key!r}] holds it, not a matrix."
            )
        return self._encode_matrix(
            X, batch_size=batch_size, return_spike=return_spike, covariates=covariates
        )

    def _encode_matrix(
        self,
        X: Any,
        *,
        batch_size: int = 4096,
        return_spike: bool = False,
        covariates: np.ndarray | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """:meth:`encode` of rows ``start:stop`` of a matrix already checked by the caller."""
        loader = MinibatchLoader(X, batch_size, device=self.device, covariates=covariates)
        empty = np.zeros((0, self.n_latent), dtype=np.float32)
        means, spikes = [empty], [empty]
        for batch in loader.sequential(batch_size, start, stop):
            out = self.module.encode(batch)
            means.append(out.mean.float().cpu().numpy())
            if return_spike:
                spikes.append(out.extras["spike"].float().cpu().numpy())
        rep = np.concatenate(means).astype(np.float32, copy=False)
        if return_spike:
            return rep, np.concatenate(spikes).astype(np.float32, copy=False)
        return rep

    def normalized_expression(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        transform_batch: str | Sequence[str] | None = None,
        library_size: float = 1.0,
        genes: Sequence[str] | None = None,
        batch_size: int = 1024,
    ) -> np.ndarray:
        """The decoder's mean expression of each cell, denoised by the model.

        Each cell is encoded to its posterior mean (the code, for the AE; no sample is drawn)
        and decoded, ``batch_size`` cells at a time, so memory grows with the output only.

        Which model denoises best is not the one with the best codes. Without a ``batch_key``
        the tools' default (a linear decoder behind the 128-32-16 encoder) was chosen for its
        latent space, and smooths expression less: on PBMC3k (13,656 genes, molecular
        cross-validation, ``benchmarks/bench_expression.py``) its NB VAE's held-out Poisson
        loss was 1,863-1,866 (seeds 0-2) against 1,576-1,581 when trained with
        ``decoder="shallow", hidden=(128,), batch_size=128`` (scVI's shape) and scVI's 1,661
        (seed 0). Train a second model with those options when expression is what you need,
        and keep the default one for the latent space: the recipe's codes separate cell
        types far worse (NB VAE, kNN purity of the labels 0.62-0.65 against 0.93-0.94 on
        CEL-seq2 and 0.59-0.62 against 0.97 on SORT-seq; PCA 0.90 and 0.91). With a
        ``batch_key`` (default ``"shallow"`` decoder) both were level on CellBench, with
        a lower loss than scVI.

        Parameters
        ----------
        adata
            AnnData with the training genes in the training order, holding what the model was
            trained on (raw counts for a count likelihood).
        layer
            Layer to encode; None for ``X``.
        batch_key
            For a model trained with a ``batch_key``: the ``obs`` column of each cell's batch;
            None uses the model's own. Needed unless ``transform_batch`` is given and the
            encoder does not see the batch (``encode_covariates=False``).
        transform_batch
            Decode every cell as if it came from this batch (a name), or average the decoded
            expression over several (a list of names). None: each cell's own batch.
        library_size
            Count likelihoods: the decoded proportions (rows sum to 1) are multiplied by this
            (``1e4`` gives counts per 10,000). Must stay 1.0 for the Gaussian.
        genes
            Return only these genes' columns, in this order; None for all. The proportions are
            still over all genes.
        batch_size
            Cells decoded at a time.

        Returns
        -------
        float32 array of shape ``(n_cells, n_genes)`` (``(n_cells, len(genes))`` with ``genes``).
        For ``"nb"``, ``"zinb"`` and ``"poisson"``: each cell's expected proportions times
        ``library_size`` (for ZINB, those of the negative binomial's mean, without the
        zero-inflation, as scvi-tools' ``get_normalized_expression``). For ``"gaussian"``: the
        reconstruction on the model's input scale, i.e. log-normalised values when the model
        was trained on ``log1p`` data, not proportions.

        Raises
        ------
        ValueError
            An unknown ``transform_batch`` (or one given to a model without batches), genes the
            model lacks, a ``library_size`` other than 1 with the Gaussian, a batch the model
            was not trained on.
        KeyError
            The batch column is missing though it is needed, or ``layer`` is.
        """
        from ._expression import normalized_expression

        return normalized_expression(
            self,
            adata,
            layer=layer,
            batch_key=batch_key,
            transform_batch=transform_batch,
            library_size=library_size,
            genes=genes,
            batch_size=batch_size,
        )

    def differential_expression(
        self,
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
        r"""Bayesian differential expression of two groups of cells, as scvi-tools' "change" mode.

        The log fold change compared is that of the groups' mean normalised expression,
        :math:`\mathrm{LFC}_g = \log_2(\bar\rho_{1g} + c) - \log_2(\bar\rho_{2g} + c)`.
        Its distribution is sampled ``n_samples`` times: each time, ``max_cells`` cells (or all,
        if fewer) are drawn with replacement from each group (a bootstrap of the group), one
        latent code is drawn from each drawn cell's posterior (VAE: Gaussian; VSC: a hard
        spike-and-slab sample), and the codes are decoded and averaged per group. ``prob_de``
        is the share of samples with :math:`|\mathrm{LFC}_g| > \delta`.

        Group means are compared rather than randomly paired cells (scvi-tools' default): a
        random pair differs by the spread of expression within each group too, so two halves of
        one varied population would look "different" for every variable gene; the bootstrap
        keeps the uncertainty of each group's mean (which shrinks with its size) and no more.
        For the deterministic AE there is no posterior: the bootstrap of the cells is the only
        uncertainty, and ``prob_de`` is that of the groups' mean expression differing by more
        than ``delta``. Drawing ``max_cells < n`` cells overstates the uncertainty of a large
        group's mean (conservative).

        Parameters
        ----------
        adata
            AnnData with the training genes in the training order (what the model encodes).
        groupby
            Categorical ``obs`` column of the groups.
        group1
            A group (or a list of groups, pooled).
        group2
            The group(s) to compare with; None: every other cell ("rest").
        layer
            Layer to encode; None for ``X``.
        batch_key
            Column of each cell's batch (models with batches); None: the model's own.
        transform_batch
            Decode every cell as this batch (or averaged over these); None: each cell's own.
        delta
            Smallest absolute log2 fold change that counts as a difference (default 0.25).
        fdr_target
            Expected false discovery rate of the genes called ``is_de`` (default 0.05).
        n_samples
            Samples of each group's mean (default 100; ``prob_de`` has this resolution).
        max_cells
            Cells drawn from a group per sample (default 1,000).
        pseudocount
            :math:`c`, added to the mean expression before the logarithm, on the scale of
            counts per 10,000 (count likelihoods) or of the normalised data (Gaussian).
            None (default): one count in the median cell of the comparison, ``10,000 /
            median total count`` (Gaussian: 1, that of ``log1p``). Genes barely detected in
            either group then keep LFCs near zero instead of large, noisy ones: with 0.1 per
            10,000, random halves of one CellBench population differed in up to 28 of 2,000
            genes, and each PBMC3k population against the rest in 3,772-8,476 of 13,656
            (``benchmarks/bench_expression.py``).
        batch_size
            Cells encoded or decoded at a time.
        random_state
            Seed of the bootstrap and of the posterior samples.

        Returns
        -------
        One row per gene (index: the gene names), columns:

        ``lfc_mean``, ``lfc_std``
            Mean and standard deviation of the sampled LFC (group1 over group2; > 0 is
            higher in group1).
        ``prob_de``
            :math:`P(|\mathrm{LFC}| > \delta)`.
        ``is_de``
            Called differentially expressed: genes sorted by ``prob_de`` (descending), the
            largest set whose mean ``1 - prob_de`` is at most ``fdr_target``.
        ``fdr``
            The expected FDR of the set of genes ranked up to this one (``is_de`` is
            ``fdr <= fdr_target``).
        ``norm_mean1``, ``norm_mean2``
            Mean normalised expression of each group (averaged over the samples): counts per
            10,000 for the count likelihoods; for the Gaussian, ``expm1`` of the
            reconstruction (the normalised scale of ``log1p`` data).
        ``frac_expressing1``, ``frac_expressing2``
            Fraction of each group's cells with a non-zero value in the data.

        Raises
        ------
        ValueError
            A group not in the column, groups shared by both sides, no cells to compare with,
            an unknown ``transform_batch``, invalid parameters.
        KeyError
            ``groupby`` (or the batch column) is not in ``obs``.
        """
        from ._expression import differential_expression

        return differential_expression(
            self,
            adata,
            groupby,
            group1,
            group2,
            layer=layer,
            batch_key=batch_key,
            transform_batch=transform_batch,
            delta=delta,
            fdr_target=fdr_target,
            n_samples=n_samples,
            max_cells=max_cells,
            pseudocount=pseudocount,
            batch_size=batch_size,
            random_state=random_state,
        )

    def with_batches(self, categories: Sequence[str]) -> LatentModel:
        """A copy of the model with one-hot columns for more batches (scArches' surgery).

        Every weight that reads the one-hot batch (:meth:`AutoencoderModule.batch_columns`:
        the encoder's with ``encode_covariates``, each decoder layer, the output layer) gets
        one new column per new batch, appended after the model's own; every other value is
        copied exactly, so cells of the model's batches are encoded bit for bit as before. A
        new column starts as the mean of the model's columns of that weight: a new batch
        starts as the average known batch. Train the new columns alone with
        :meth:`AutoencoderModule.train_batches_only` (``sv.tl.map_query`` does).

        Parameters
        ----------
        categories
            The batches to add, in order; those the model knows are skipped.

        Returns
        -------
        The extended model, on the same device, in evaluation mode; ``batch_categories`` are
        the model's followed by the new ones. This model is left unchanged.

        Raises
        ------
        ValueError
            The model was trained without a ``batch_key``: it has no batch columns to extend.
        """
        if not self.batch_categories:
            raise ValueError(
                "This model was trained without a batch_key, so no layer reads a batch and "
                "there is nothing to extend. Train the reference with batch_key= (and "
                "encode_covariates=True)."
            )
        new = list(dict.fromkeys(str(c) for c in categories if str(c) not in self.batch_categories))
        # The fresh module's random initialisation is overwritten below: keep the caller's
        # global random state as it was.
        with torch.random.fork_rng(devices=[]):
            extended = LatentModel(
                self.kind,
                self.var_names,
                self.config,
                batch_key=self.batch_key,
                batch_categories=self.batch_categories + new,
            )
        first = len(self.batch_categories)
        columns = self.module.batch_columns()
        target = extended.module.state_dict()
        state = {}
        for name, value in self.module.state_dict().items():
            value = value.detach()
            if name in columns:
                at = columns[name]
                mean = value[:, at : at + first].mean(1, keepdim=True).expand(-1, len(new))
                joined = torch.cat([value[:, : at + first], mean, value[:, at + first :]], 1)
                # OutputLinear pads its width to a multiple of 8 with zero columns.
                width = min(joined.shape[1], target[name].shape[1])
                value = torch.zeros_like(target[name], device=value.device)
                value[:, :width] = joined[:, :width]
            state[name] = value.clone()
        extended.module.load_state_dict(state)
        extended.module.to(self.device).eval()
        return extended

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to ``path`` (a ``.pt`` file); restore it with :func:`load`."""
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        payload = {
            "format_version": _FORMAT_VERSION,
            "kind": self.kind,
            "var_names": self.var_names,
            "config": {**self.config, "hidden": list(self.config["hidden"])},
            "batch_key": self.batch_key,
            "batch_categories": self.batch_categories,
            "state_dict": state,
        }
        torch.save(payload, os.fspath(path))


def load(path: str | os.PathLike, device: str = "cpu") -> LatentModel:
    """Restore a model written by :meth:`LatentModel.save`.

    Parameters
    ----------
    path
        File written by :meth:`LatentModel.save`.
    device
        Where to put the parameters (``"cpu"``, ``"cuda"``...).

    Returns
    -------
    The model, in evaluation mode.
    """
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch raises several types for files it cannot read
        raise ValueError(
            f"{path} is not a scvae-tools model file: torch cannot read it "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Pass a file "
            "written by `model.save(path)` or `scvae-tools train --save-model`."
        ) from None
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version not in (1, _FORMAT_VERSION):
        raise ValueError(f"{path} is not a scvae-tools model file (or from a newer version).")
    state = payload["state_dict"]
    if version == 1:
        # Version 1 had the output layer on the module itself (Gaussian only, no batches).
        state = {
            (f"likelihood.{k}" if k.startswith("output_layer.") else k): v for k, v in state.items()
        }
    model = LatentModel(
        payload["kind"],
        payload["var_names"],
        payload["config"],
        batch_key=payload.get("batch_key"),
        batch_categories=payload.get("batch_categories", ()),
    )
    model.module.load_state_dict(state)
    model.module.to(device).eval()
    return model
