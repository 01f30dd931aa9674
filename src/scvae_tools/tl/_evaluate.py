"""``sv.tl.evaluate`` and ``sv.tl.tsne3d``: the write-up's evaluation protocol on any AnnData."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE
from sklearn.metrics import (
    adjusted_rand_score,
    completeness_score,
    homogeneity_score,
    normalized_mutual_info_score,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors
from tqdm.auto import tqdm

from .._checks import check_int

__all__ = ["PROTOCOL_METRICS", "evaluate", "tsne3d"]

#: The write-up's metrics, computed on k-means of the 2-D t-SNE.
PROTOCOL_METRICS = ("nmi", "ari", "homogeneity", "completeness")
_LATENT_METRICS = ("latent_nmi", "latent_ari", "knn_purity", "silhouette")


def _rep_name(rep: str) -> str:
    return rep[2:] if rep.startswith("X_") else rep


def _representation(adata: AnnData, rep: str) -> np.ndarray:
    if rep not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {rep!r}; present: {sorted(adata.obsm.keys())}. Train it first "
            f"(e.g. sv.tl.{_rep_name(rep)}(adata)) or pass the obsm keys you have as `reps`."
        )
    x = np.asarray(adata.obsm[rep], dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != adata.n_obs:
        raise ValueError(f"adata.obsm[{rep!r}] must have shape (n_obs, k), got {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"adata.obsm[{rep!r}] holds NaN or infinite values; recompute it.")
    return x


def _tsne(
    x: np.ndarray, n_components: int, perplexity: float, seed: int, *, for_plot: bool = False
) -> np.ndarray:
    if for_plot:
        # A picture, not a protocol: PCA initialisation keeps the global layout and leaves no
        # cells stranded far from the rest, which random starts in 3-D often do.
        return TSNE(
            n_components=n_components,
            perplexity=perplexity,
            init="pca",
            learning_rate="auto",
            random_state=seed,
        ).fit_transform(x)
    # The write-up's t-SNE (scikit-learn's defaults of 2019): a random start, so that the seed
    # matters and repeats measure the protocol's spread; PCA initialisation would make every
    # seed give the same map.
    return TSNE(
        n_components=n_components,
        perplexity=perplexity,
        init="random",
        learning_rate=200.0,
        random_state=seed,
    ).fit_transform(x)


def _check_perplexity(perplexity: Any, n_obs: int) -> float:
    if isinstance(perplexity, bool) or not isinstance(perplexity, numbers.Real):
        raise TypeError(f"`perplexity` must be a number, got {perplexity!r}.")
    if not 0 < perplexity < n_obs:
        raise ValueError(
            f"`perplexity` must lie in (0, n_obs={n_obs}), got {perplexity}; t-SNE needs more "
            "cells than its perplexity. Lower it."
        )
    return float(perplexity)


def _partition_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    return {
        "nmi": normalized_mutual_info_score(labels, clusters),
        "ari": adjusted_rand_score(labels, clusters),
        "homogeneity": homogeneity_score(labels, clusters),
        "completeness": completeness_score(labels, clusters),
    }


def _knn_purity(x: np.ndarray, labels: np.ndarray, n_neighbors: int) -> float:
    k = min(n_neighbors, len(labels) - 1)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)
    # Column 0 is the cell itself (or a duplicate of it); either way it is not a neighbour.
    return float((labels[idx[:, 1:]] == labels[:, None]).mean())


def evaluate(
    adata: AnnData,
    label_key: str,
    reps: Sequence[str] = ("X_ae", "X_vae", "X_vsc"),
    *,
    n_seeds: int = 5,
    perplexity: float = 40.0,
    n_init: int = 100,
    n_neighbors: int = 15,
    random_state: int = 0,
    key_added: str = "evaluate",
    progress: bool = True,
) -> pd.DataFrame:
    """Score latent spaces against labels with the write-up's protocol, over several seeds.

    For each representation and each seed: a 2-D t-SNE (perplexity 40, random initialisation,
    learning rate 200: scikit-learn's t-SNE as the write-up ran it),
    k-means on it with ``k`` = the number of label classes and ``n_init=100``, and the NMI, ARI,
    homogeneity and completeness of that partition against the labels. Because t-SNE and k-means
    are stochastic, the protocol is repeated with seeds ``random_state, random_state + 1, ...``
    and the mean and standard deviation are reported. Metrics that need no t-SNE are added:
    k-means directly on the latent (``latent_nmi``, ``latent_ari``), the fraction of each cell's
    nearest neighbours in the latent that share its label (``knn_purity``), and the silhouette
    of the labels in the latent (``silhouette``; the last two are deterministic, std 0).

    Parameters
    ----------
    adata
        Annotated data matrix with the representations in ``obsm``, shape ``(n_obs, k)`` each.
    label_key
        Column of ``adata.obs`` with the reference labels (e.g. ``"seurat_clusters"``); every
        cell needs one.
    reps
        Keys of ``adata.obsm`` to score. Default ``("X_ae", "X_vae", "X_vsc")``.
    n_seeds
        Repeats of t-SNE + k-means. Default 5.
    perplexity
        t-SNE perplexity. Default 40, the write-up's.
    n_init
        k-means restarts. Default 100, the write-up's.
    n_neighbors
        Neighbours for ``knn_purity``. Default 15.
    random_state
        First seed; seed ``i`` is ``random_state + i``. Default 0.
    key_added
        Key in ``adata.uns`` for the results. Default ``"evaluate"``.
    progress
        Show a progress bar over representations x seeds. Default True.

    Returns
    -------
    The summary, a tidy :class:`pandas.DataFrame` with one row per representation and metric:
    columns ``rep``, ``metric``, ``mean``, ``std`` (population standard deviation over seeds) and
    ``n_seeds``. Also written to ``adata``:

    ``adata.uns[key_added]`` : :class:`dict`
        ``summary`` (the returned frame), ``runs`` (one row per representation, seed and metric:
        ``rep``, ``seed``, ``metric``, ``value``) and ``params``.
    ``adata.obsm["X_tsne_{name}"]`` : :class:`numpy.ndarray` ``(n_obs, 2)``, float32
        The first seed's t-SNE of each representation, ``name`` being the key without its
        ``X_`` prefix (``X_vsc`` gives ``X_tsne_vsc``: ``sc.pl.embedding(adata, "tsne_vsc")``).
    ``adata.obs["kmeans_{name}"]`` : categorical
        The first seed's k-means partition of that t-SNE.

    Raises
    ------
    KeyError
        ``label_key`` not in ``adata.obs``, or a representation not in ``adata.obsm``.
    ValueError
        Missing labels, fewer than two label classes, non-finite representations, invalid
        ``n_seeds``, ``n_init``, ``n_neighbors`` or ``perplexity``.
    TypeError
        ``n_seeds``, ``n_init`` or ``n_neighbors`` not an integer, ``perplexity`` not a number.

    Examples
    --------
    >>> sv.tl.evaluate(adata, "bulk_labels", n_seeds=3)  # doctest: +SKIP
    >>> sv.pl.metrics_heatmap(adata)  # doctest: +SKIP
    """
    if adata.n_obs < 3:
        raise ValueError(f"evaluate needs at least 3 cells, got {adata.n_obs}.")
    if label_key not in adata.obs:
        raise KeyError(
            f"adata.obs has no column {label_key!r}; present: {list(adata.obs.columns)}."
        )
    raw_labels = adata.obs[label_key]
    if raw_labels.isna().any():
        raise ValueError(
            f"{int(raw_labels.isna().sum())} cells have no {label_key!r} label; subset to the "
            f"labelled cells first (adata[adata.obs[{label_key!r}].notna()])."
        )
    labels = pd.factorize(raw_labels.astype(str))[0]
    n_classes = int(labels.max()) + 1
    if n_classes < 2:
        raise ValueError(f"obs[{label_key!r}] has a single class; scores need at least two.")
    if isinstance(reps, str):
        reps = (reps,)
    reps = tuple(reps)
    if not reps:
        raise ValueError("`reps` is empty; pass obsm keys such as ('X_vae', 'X_vsc').")
    n_seeds = check_int("n_seeds", n_seeds)
    n_init = check_int("n_init", n_init)
    n_neighbors = check_int("n_neighbors", n_neighbors)
    perplexity = _check_perplexity(perplexity, adata.n_obs)
    latents = {rep: _representation(adata, rep) for rep in reps}

    runs: list[dict[str, Any]] = []
    first: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    bar = tqdm(total=len(reps) * n_seeds, desc="evaluate", disable=not progress)
    try:
        for rep, x in latents.items():
            purity = _knn_purity(x, labels, n_neighbors)
            silhouette = float(silhouette_score(x, labels)) if len(x) > n_classes else np.nan
            for i in range(n_seeds):
                seed = random_state + i
                bar.set_postfix_str(f"{rep}, seed {seed}")
                emb = _tsne(x, 2, perplexity, seed)
                km = KMeans(n_clusters=n_classes, n_init=n_init, random_state=seed)
                clusters = km.fit_predict(emb)
                scores = _partition_scores(labels, clusters)
                latent_km = KMeans(n_clusters=n_classes, n_init=n_init, random_state=seed)
                latent_clusters = latent_km.fit_predict(x)
                scores["latent_nmi"] = normalized_mutual_info_score(labels, latent_clusters)
                scores["latent_ari"] = adjusted_rand_score(labels, latent_clusters)
                scores["knn_purity"] = purity
                scores["silhouette"] = silhouette
                runs += [
                    {"rep": rep, "seed": seed, "metric": m, "value": float(v)}
                    for m, v in scores.items()
                ]
                if i == 0:
                    first[rep] = (emb.astype(np.float32), clusters)
                bar.update()
    finally:
        bar.close()

    runs_df = pd.DataFrame(runs)
    order = list(PROTOCOL_METRICS + _LATENT_METRICS)
    summary = (
        runs_df.groupby(["rep", "metric"], sort=False)["value"]
        .agg(mean="mean", std=lambda v: float(np.std(v)), n_seeds="size")
        .reset_index()
    )
    summary["metric"] = pd.Categorical(summary["metric"], categories=order, ordered=True)
    summary["rep"] = pd.Categorical(summary["rep"], categories=list(reps), ordered=True)
    summary = summary.sort_values(["rep", "metric"]).reset_index(drop=True)
    summary["rep"] = summary["rep"].astype(str)
    summary["metric"] = summary["metric"].astype(str)
    summary["n_seeds"] = summary["n_seeds"].astype(int)

    # Everything is computed; only now is the AnnData touched.
    for rep, (emb, clusters) in first.items():
        name = _rep_name(rep)
        adata.obsm[f"X_tsne_{name}"] = emb
        adata.obs[f"kmeans_{name}"] = pd.Categorical(
            clusters.astype(str), categories=[str(c) for c in range(n_classes)]
        )
    adata.uns[key_added] = {
        "summary": summary,
        "runs": runs_df,
        "params": {
            "label_key": label_key,
            "reps": list(reps),
            "n_seeds": int(n_seeds),
            "perplexity": perplexity,
            "n_init": int(n_init),
            "n_neighbors": int(n_neighbors),
            "random_state": int(random_state),
            "n_clusters": n_classes,
        },
    }
    return summary


def tsne3d(
    adata: AnnData,
    use_rep: str = "X_vsc",
    *,
    perplexity: float = 40.0,
    random_state: int = 0,
    key_added: str | None = None,
) -> None:
    """Three-dimensional t-SNE of a representation (``sc.tl.tsne`` is 2-D only).

    scikit-learn's t-SNE with three components, as in the write-up's 3-D figures, started from
    the PCA of the representation (learning rate ``"auto"``): random starts, as in
    :func:`evaluate`, often leave a few cells stranded far from the rest in 3-D.

    Parameters
    ----------
    adata
        Annotated data matrix with ``adata.obsm[use_rep]`` of shape ``(n_obs, k)``.
    use_rep
        Key of ``adata.obsm`` to embed. Default ``"X_vsc"``.
    perplexity
        t-SNE perplexity. Default 40.
    random_state
        Seed of the t-SNE. Default 0.
    key_added
        Write ``adata.obsm[key_added]`` instead of the default ``"X_tsne3d"``.

    Returns
    -------
    Nothing; sets ``adata.obsm["X_tsne3d"]`` (or ``key_added``), float32 ``(n_obs, 3)``, and
    ``adata.uns["tsne3d"]`` (or ``key_added``) with the parameters. Plot it with
    ``sc.pl.embedding(adata, "tsne3d", projection="3d", color=...)``.

    Raises
    ------
    KeyError
        ``use_rep`` not in ``adata.obsm``.
    ValueError
        Non-finite representation, or ``perplexity`` not below the number of cells.
    """
    x = _representation(adata, use_rep)
    perplexity = _check_perplexity(perplexity, adata.n_obs)
    emb = _tsne(x, 3, perplexity, random_state, for_plot=True).astype(np.float32)
    key = key_added or "X_tsne3d"
    adata.obsm[key] = emb
    adata.uns[_rep_name(key)] = {
        "params": {"use_rep": use_rep, "perplexity": perplexity, "random_state": random_state}
    }
