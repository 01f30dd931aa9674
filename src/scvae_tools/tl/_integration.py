"""The scIB integration metrics of ``sv.tl.evaluate(..., batch_key=...)``, from scib-metrics.

Every score is computed by scib-metrics (Luecken et al. 2022, *Benchmarking atlas-level data
integration in single-cell genomics*); this module only feeds it. The metric set, the
neighbourhood sizes (15 for graph connectivity, 50 for kBET, 90 for the LISI scores) and the
aggregation (the mean of each group, total = 0.6 bio + 0.4 batch) are those of scib-metrics'
``Benchmarker``, with scIB's batch silhouette (``silhouette_batch``) as the batch silhouette.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "AGGREGATES",
    "BATCH_METRICS",
    "BIO_METRICS",
    "METRIC_NAMES",
    "SCIB_METRICS",
    "require_scib",
    "scib_scores",
]

#: Bio conservation: how well the labels stay apart.
BIO_METRICS = ("isolated_labels", "kmeans_nmi", "kmeans_ari", "silhouette_label", "clisi")
#: Batch correction: how well the batches mix within each label.
BATCH_METRICS = ("silhouette_batch", "ilisi", "kbet", "graph_connectivity", "pcr_comparison")
#: The scIB totals: the mean of each group, and 0.6 bio + 0.4 batch.
AGGREGATES = ("bio_conservation", "batch_correction", "total")
SCIB_METRICS = BIO_METRICS + BATCH_METRICS + AGGREGATES
#: The names scib-metrics' Benchmarker gives them.
METRIC_NAMES = {
    "isolated_labels": "Isolated labels",
    "kmeans_nmi": "KMeans NMI",
    "kmeans_ari": "KMeans ARI",
    "silhouette_label": "Silhouette label",
    "clisi": "cLISI",
    "silhouette_batch": "Silhouette batch",
    "ilisi": "iLISI",
    "kbet": "KBET",
    "graph_connectivity": "Graph connectivity",
    "pcr_comparison": "PCR comparison",
    "bio_conservation": "Bio conservation",
    "batch_correction": "Batch correction",
    "total": "Total",
}
_BIO_WEIGHT = 0.6  # scIB's weighting (Luecken et al. 2022), as in scib-metrics' Benchmarker
_NEIGHBORS = (15, 50, 90)


def require_scib() -> Any:
    """Import scib-metrics, or an ImportError that names the extra to install."""
    try:
        import scib_metrics
    except ImportError as err:
        raise ImportError(
            "The integration metrics (sv.tl.evaluate with batch_key=) are computed by "
            "scib-metrics, which is not installed. Install the extra: "
            'pip install "scvae-tools[metrics]"'
        ) from err
    return scib_metrics


def _neighbors(x: np.ndarray, n_neighbors: int) -> Any:
    """Exact nearest neighbours, each cell first in its own list (as scib-metrics expects).

    scib-metrics' own default is pynndescent, approximate and slow to compile on first use;
    exact neighbours are as fast here, with latent spaces of a few dimensions.
    """
    from scib_metrics.nearest_neighbors import NeighborsResults

    k = min(n_neighbors, len(x))
    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return NeighborsResults(indices=indices, distances=distances)


def scib_scores(
    x: np.ndarray, labels: np.ndarray, batch: np.ndarray, x_pre: np.ndarray
) -> dict[str, float]:
    """The scIB metrics and totals of one embedding.

    Parameters
    ----------
    x
        The embedding, ``(n_obs, k)``.
    labels
        Integer label codes, ``(n_obs,)``.
    batch
        Integer batch codes, ``(n_obs,)``.
    x_pre
        The unintegrated embedding that PCR comparison compares ``x`` with, ``(n_obs, k_pre)``.

    Returns
    -------
    One value per name of :data:`SCIB_METRICS`, each in [0, 1] (higher is better); NaN where
    scib-metrics gives none (kBET when no label holds two batches). The totals skip NaNs, as
    the Benchmarker's do.
    """
    sm = require_scib()
    # jax computes in float32; handing it float64 only earns a warning per call.
    x = np.ascontiguousarray(x, dtype=np.float32)
    x_pre = np.ascontiguousarray(x_pre, dtype=np.float32)
    knn = _neighbors(x, max(_NEIGHBORS))
    nn = {n: knn.subset_neighbors(min(n, knn.n_neighbors)) for n in _NEIGHBORS}
    clustering = sm.nmi_ari_cluster_labels_kmeans(x, labels)
    scores = {
        "isolated_labels": sm.isolated_labels(x, labels, batch),
        "kmeans_nmi": clustering["nmi"],
        "kmeans_ari": clustering["ari"],
        "silhouette_label": sm.silhouette_label(x, labels),
        "clisi": sm.clisi_knn(nn[90], labels),
        "silhouette_batch": sm.silhouette_batch(x, labels, batch),
        "ilisi": sm.ilisi_knn(nn[90], batch),
    }
    with warnings.catch_warnings():
        # kBET is NaN for a label seen in one batch only; the mean over labels then warns.
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        scores["kbet"] = sm.kbet_per_label(nn[50], batch, labels)
    scores["graph_connectivity"] = sm.graph_connectivity(nn[15], labels)
    with warnings.catch_warnings():
        # A negative comparison (more batch variance than before) is clipped to 0, by design.
        warnings.filterwarnings("ignore", message="PCR comparison score is negative")
        scores["pcr_comparison"] = sm.pcr_comparison(x_pre, x, batch, categorical=True)
    scores = {name: float(value) for name, value in scores.items()}
    bio = _nanmean([scores[m] for m in BIO_METRICS])
    batch_score = _nanmean([scores[m] for m in BATCH_METRICS])
    scores["bio_conservation"] = bio
    scores["batch_correction"] = batch_score
    scores["total"] = _BIO_WEIGHT * bio + (1 - _BIO_WEIGHT) * batch_score
    return scores


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
