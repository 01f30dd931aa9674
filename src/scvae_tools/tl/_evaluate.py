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

from .._checks import check_bool, check_int
from .._data import get_matrix, obs_column
from ._integration import SCIB_METRICS, require_scib, scib_scores

__all__ = ["PROTOCOL_METRICS", "evaluate", "tsne3d"]

#: The write-up's metrics, computed on k-means of the 2-D t-SNE.
PROTOCOL_METRICS = ("nmi", "ari", "homogeneity", "completeness")
_LATENT_METRICS = ("latent_nmi", "latent_ari", "knn_purity", "silhouette")
#: Dimensions of the PCA reference besides those of the latent spaces.
_PCA_REFERENCE_DIMS = 10
#: Components of the unintegrated PCA that PCR comparison measures against (scanpy's default).
_PCA_PRE_DIMS = 50


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


def _looks_like_counts(X: Any) -> bool:
    values = X.data if hasattr(X, "data") and not isinstance(X, np.ndarray) else np.asarray(X)
    values = np.asarray(values)
    return values.size > 0 and bool(np.all(values >= 0) and np.all(np.mod(values, 1) == 0))


def _model_layer(adata: AnnData, reps: Sequence[str]) -> str | None:
    """The layer the models behind ``reps`` trained on, when their records agree on one."""
    layers = set()
    for rep in reps:
        record = adata.uns.get(rep, adata.uns.get(_rep_name(rep)))
        params = record.get("params") if isinstance(record, dict) else None
        if isinstance(params, dict) and "layer" in params and "model" in params:
            layers.add(str(params["layer"]))
    if len(layers) == 1:
        (layer,) = layers
        return None if layer == "X" or layer not in adata.layers else layer
    return None


def _pca_of_input(
    adata: AnnData, reps: Sequence[str], n_comps: int, random_state: int
) -> tuple[np.ndarray, str]:
    """PCA of the matrix the models trained on; counts are log-normalised first.

    Returns the ``(n_obs, n_comps)`` coordinates and a description of the input.
    """
    import scanpy as sc

    layer = _model_layer(adata, reps)
    X = get_matrix(adata, layer)
    name = "X" if layer is None else f"layers[{layer!r}]"
    if hasattr(X, "to_memory"):  # backed
        X = X.to_memory()
    if _looks_like_counts(X):
        # PCA of raw counts is nobody's baseline: the scanpy/Seurat recipe comes first.
        tmp = AnnData(X.astype(np.float32, copy=True))
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
        X, name = tmp.X, f"{name} (normalize_total 1e4, log1p)"
    coords = sc.pp.pca(X, n_comps=n_comps, random_state=random_state)
    return np.asarray(coords, dtype=np.float64), name


def evaluate(
    adata: AnnData,
    label_key: str,
    reps: Sequence[str] = ("X_ae", "X_vae", "X_vsc"),
    *,
    batch_key: str | None = None,
    pca: bool = True,
    protocol: bool = True,
    n_seeds: int = 5,
    perplexity: float = 40.0,
    n_init: int = 100,
    n_neighbors: int = 15,
    random_state: int = 0,
    key_added: str = "evaluate",
    progress: bool = True,
) -> pd.DataFrame:
    """Score latent spaces against labels with the write-up's protocol, and across batches.

    For each representation and each seed: a 2-D t-SNE (perplexity 40, random initialisation,
    learning rate 200: scikit-learn's t-SNE as the write-up ran it),
    k-means on it with ``k`` = the number of label classes and ``n_init=100``, and the NMI, ARI,
    homogeneity and completeness of that partition against the labels. Because t-SNE and k-means
    are stochastic, the protocol is repeated with seeds ``random_state, random_state + 1, ...``
    and the mean and standard deviation are reported. Metrics that need no t-SNE are added:
    k-means directly on the latent (``latent_nmi``, ``latent_ari``), the fraction of each cell's
    nearest neighbours in the latent that share its label (``knn_purity``), and the silhouette
    of the labels in the latent (``silhouette``; the last two are deterministic, std 0).

    **Reference rows.** With ``pca=True`` (the default) the PCA of the models' own input is
    scored beside them, as ``pca{n}``: with as many components as each latent space has, and
    with 10. The input is the layer the models behind ``reps`` were trained on, when their
    ``uns`` records agree on one, else ``X``; raw counts are log-normalised first
    (``normalize_total`` to 10,000, ``log1p``), since that is the PCA a scanpy user would run.

    **Integration metrics.** With ``batch_key``, every representation is also scored by the
    scIB metrics (Luecken et al. 2022), computed by scib-metrics (``pip install
    "scvae-tools[metrics]"``): bio conservation (``isolated_labels``, ``kmeans_nmi``,
    ``kmeans_ari``, ``silhouette_label``, ``clisi``) and batch correction
    (``silhouette_batch``, ``ilisi``, ``kbet``, ``graph_connectivity``, ``pcr_comparison``,
    the last against the 50-component PCA of the input above), each in [0, 1], higher better;
    and scIB's totals: ``bio_conservation`` and ``batch_correction`` (the mean of each group)
    and ``total`` = 0.6 bio + 0.4 batch, as scib-metrics' ``Benchmarker`` computes them on
    unscaled scores (``min_max_scale=False``: a score does not depend on which other
    representations are compared). They are deterministic and computed once.

    Parameters
    ----------
    adata
        Annotated data matrix with the representations in ``obsm``, shape ``(n_obs, k)`` each.
    label_key
        Column of ``adata.obs`` with the reference labels (e.g. ``"seurat_clusters"``); every
        cell needs one.
    reps
        Keys of ``adata.obsm`` to score. Default ``("X_ae", "X_vae", "X_vsc")``.
    batch_key
        Column of ``adata.obs`` with the batch (sample, donor, protocol) of each cell, at least
        two batches and no missing values: adds the scIB metrics. Default None (none).
    pca
        Score the PCA reference rows. Default True. A reference whose name (``pca10``) is
        already among ``reps`` is not added again.
    protocol
        Run the t-SNE + k-means protocol and the metrics beside it. ``False`` computes only the
        scIB metrics (needs ``batch_key``), which is much faster on large data. Default True.
    n_seeds
        Repeats of t-SNE + k-means. Default 5.
    perplexity
        t-SNE perplexity. Default 40, the write-up's.
    n_init
        k-means restarts. Default 100, the write-up's.
    n_neighbors
        Neighbours for ``knn_purity``. Default 15.
    random_state
        First seed; seed ``i`` is ``random_state + i``; also the seed of the PCA. Default 0.
    key_added
        Key in ``adata.uns`` for the results. Default ``"evaluate"``.
    progress
        Show a progress bar over representations x seeds. Default True.

    Returns
    -------
    The summary, a tidy :class:`pandas.DataFrame` with one row per representation and metric:
    columns ``rep``, ``metric``, ``mean``, ``std`` (population standard deviation over seeds;
    NaN for the scIB metrics, computed once) and ``n_seeds`` (1 for the scIB metrics). The
    representations come in the order of ``reps``, then the PCA references. Also written to
    ``adata``:

    ``adata.uns[key_added]`` : :class:`dict`
        ``summary`` (the returned frame), ``runs`` (one row per representation, seed and
        protocol metric: ``rep``, ``seed``, ``metric``, ``value``; empty with
        ``protocol=False``), ``params``, and with ``batch_key`` ``scib``: the scIB metrics
        and totals as a wide :class:`pandas.DataFrame`, one row per representation, one
        column per metric (the scIB metrics above, then the three totals).
    ``adata.obsm["X_tsne_{name}"]`` : :class:`numpy.ndarray` ``(n_obs, 2)``, float32
        The first seed's t-SNE of each representation, ``name`` being the key without its
        ``X_`` prefix (``X_vsc`` gives ``X_tsne_vsc``: ``sc.pl.embedding(adata, "tsne_vsc")``;
        the reference ``pca10`` gives ``X_tsne_pca10``). Not with ``protocol=False``.
    ``adata.obs["kmeans_{name}"]`` : categorical
        The first seed's k-means partition of that t-SNE. Not with ``protocol=False``.

    Raises
    ------
    KeyError
        ``label_key`` or ``batch_key`` not in ``adata.obs``, or a representation not in
        ``adata.obsm``.
    ValueError
        Missing labels or batches, fewer than two label classes or batches, non-finite
        representations, invalid ``n_seeds``, ``n_init``, ``n_neighbors`` or ``perplexity``,
        ``protocol=False`` without ``batch_key``.
    TypeError
        ``n_seeds``, ``n_init`` or ``n_neighbors`` not an integer, ``perplexity`` not a number.
    ImportError
        ``batch_key`` is given but scib-metrics is not installed (``pip install
        "scvae-tools[metrics]"``).

    Examples
    --------
    >>> sv.tl.evaluate(adata, "bulk_labels", n_seeds=3)  # doctest: +SKIP
    >>> sv.pl.metrics_heatmap(adata)  # doctest: +SKIP
    >>> sv.tl.evaluate(adata, "cell_type", batch_key="sample")  # doctest: +SKIP
    >>> sv.pl.integration_scores(adata)  # doctest: +SKIP
    """
    if adata.n_obs < 3:
        raise ValueError(f"evaluate needs at least 3 cells, got {adata.n_obs}.")
    labels = pd.factorize(obs_column(adata, label_key, argument="label_key", what="label"))[0]
    n_classes = int(labels.max()) + 1
    if n_classes < 2:
        raise ValueError(f"obs[{label_key!r}] has a single class; scores need at least two.")
    pca = check_bool("pca", pca)
    protocol = check_bool("protocol", protocol)
    batches = None
    if batch_key is not None:
        batches = _batch_codes(adata, batch_key)
        require_scib()  # before any work: the missing extra is the first thing to hear of
    elif not protocol:
        raise ValueError(
            "protocol=False leaves nothing to compute without batch_key; pass batch_key= for "
            "the scIB metrics, or keep protocol=True."
        )
    if isinstance(reps, str):
        reps = (reps,)
    reps = tuple(reps)
    if not reps:
        raise ValueError("`reps` is empty; pass obsm keys such as ('X_vae', 'X_vsc').")
    n_seeds = check_int("n_seeds", n_seeds)
    n_init = check_int("n_init", n_init)
    n_neighbors = check_int("n_neighbors", n_neighbors)
    random_state = check_int("random_state", random_state, minimum=0)
    if protocol:
        perplexity = _check_perplexity(perplexity, adata.n_obs)
    latents = {rep: _representation(adata, rep) for rep in reps}

    references: list[str] = []
    pca_input = None
    x_pre = None
    if pca or batches is not None:
        n_max = min(adata.n_obs, adata.n_vars) - 1
        dims = sorted({x.shape[1] for x in latents.values()} | {_PCA_REFERENCE_DIMS})
        dims = [d for d in dims if d <= n_max]
        n_comps = max([*dims, min(_PCA_PRE_DIMS, n_max)])
        if n_comps < 1:
            raise ValueError(
                f"The PCA reference needs at least 2 cells and 2 variables, got "
                f"{adata.n_obs} x {adata.n_vars}; pass pca=False."
            )
        coords, pca_input = _pca_of_input(adata, reps, n_comps, random_state)
        x_pre = coords[:, : min(_PCA_PRE_DIMS, n_comps)]
        if pca:
            taken = {_rep_name(rep) for rep in reps}
            for d in dims:
                if f"pca{d}" not in taken:
                    latents[f"pca{d}"] = np.ascontiguousarray(coords[:, :d])
                    references.append(f"pca{d}")

    runs: list[dict[str, Any]] = []
    first: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    scib: dict[str, dict[str, float]] = {}
    steps = len(latents) * ((n_seeds if protocol else 0) + (batches is not None))
    bar = tqdm(total=steps, desc="evaluate", disable=not progress)
    try:
        for rep, x in latents.items():
            if protocol:
                runs += _protocol_runs(
                    rep,
                    x,
                    labels,
                    n_classes,
                    n_seeds=n_seeds,
                    perplexity=perplexity,
                    n_init=n_init,
                    n_neighbors=n_neighbors,
                    random_state=random_state,
                    first=first,
                    bar=bar,
                )
            if batches is not None:
                bar.set_postfix_str(f"{rep}, scIB metrics")
                scib[rep] = scib_scores(x, labels, batches, x_pre)
                bar.update()
    finally:
        bar.close()

    order = list(PROTOCOL_METRICS + _LATENT_METRICS + SCIB_METRICS)
    runs_df = pd.DataFrame(runs, columns=["rep", "seed", "metric", "value"])
    parts = []
    if runs:
        parts.append(
            runs_df.groupby(["rep", "metric"], sort=False)["value"]
            .agg(mean="mean", std=lambda v: float(np.std(v)), n_seeds="size")
            .reset_index()
        )
    if scib:
        parts.append(
            pd.DataFrame(
                [
                    {"rep": rep, "metric": m, "mean": v, "std": np.nan, "n_seeds": 1}
                    for rep, scores in scib.items()
                    for m, v in scores.items()
                ]
            )
        )
    summary = pd.concat(parts, ignore_index=True)
    summary["metric"] = pd.Categorical(summary["metric"], categories=order, ordered=True)
    summary["rep"] = pd.Categorical(summary["rep"], categories=list(latents), ordered=True)
    summary = summary.sort_values(["rep", "metric"]).reset_index(drop=True)
    summary["rep"] = summary["rep"].astype(str)
    summary["metric"] = summary["metric"].astype(str)
    summary["n_seeds"] = summary["n_seeds"].astype(int)
    summary["std"] = summary["std"].astype(float)

    params: dict[str, Any] = {
        "label_key": label_key,
        "reps": list(reps),
        "pca": pca,
        "protocol": protocol,
        "n_seeds": int(n_seeds),
        "n_init": int(n_init),
        "n_neighbors": int(n_neighbors),
        "random_state": int(random_state),
        "n_clusters": n_classes,
    }
    if protocol:
        params["perplexity"] = perplexity
    if references:
        params["references"] = references
    if pca_input is not None:
        params["pca_input"] = pca_input
    if batch_key is not None:  # h5ad cannot store None
        params["batch_key"] = batch_key
    record: dict[str, Any] = {"summary": summary, "runs": runs_df, "params": params}
    if scib:
        table = pd.DataFrame.from_dict(scib, orient="index")[list(SCIB_METRICS)]
        table.index.name = "rep"
        record["scib"] = table

    # Everything is computed; only now is the AnnData touched.
    for rep, (emb, clusters) in first.items():
        name = _rep_name(rep)
        adata.obsm[f"X_tsne_{name}"] = emb
        adata.obs[f"kmeans_{name}"] = pd.Categorical(
            clusters.astype(str), categories=[str(c) for c in range(n_classes)]
        )
    adata.uns[key_added] = record
    return summary


def _batch_codes(adata: AnnData, batch_key: str) -> np.ndarray:
    raw = obs_column(adata, batch_key, argument="batch_key", what="batch")
    codes = pd.factorize(raw)[0]
    if codes.max() < 1:
        raise ValueError(
            f"obs[{batch_key!r}] holds a single batch ({str(raw[0])!r}); the integration "
            "metrics need at least two. Leave batch_key=None for one sample."
        )
    return codes


def _protocol_runs(
    rep: str,
    x: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    n_seeds: int,
    perplexity: float,
    n_init: int,
    n_neighbors: int,
    random_state: int,
    first: dict[str, tuple[np.ndarray, np.ndarray]],
    bar: Any,
) -> list[dict[str, Any]]:
    """The t-SNE + k-means protocol and the metrics beside it, over seeds, for one rep."""
    runs = []
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
            {"rep": rep, "seed": seed, "metric": m, "value": float(v)} for m, v in scores.items()
        ]
        if i == 0:
            first[rep] = (emb.astype(np.float32), clusters)
        bar.update()
    return runs


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
