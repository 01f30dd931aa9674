"""A fitted model: the torch module plus what is needed to encode new data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
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
        X = self._matrix(data, layer)
        counts_for = self.likelihood if LIKELIHOODS[self.likelihood].counts else None
        # On-disk data is checked for NaN as the encoding reads it.
        validate_matrix(X, name="the input", counts_for=counts_for, first_block_only=is_backed(X))
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
