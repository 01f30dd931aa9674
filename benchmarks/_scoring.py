"""The benchmarks' scores: one function per kind of data set.

Single samples: the kNN purity of the labels (k = 15), and the NMI and ARI of Leiden clusters
(resolution chosen among 0.2, 0.4, ..., 2.0 for the best NMI, as scIB does) and of k-means
(k = the number of labels), both from scib-metrics. Several batches: the scIB metrics of
``sv.tl.evaluate(..., batch_key=...)`` (scib-metrics, unscaled; total = 0.6 bio + 0.4 batch).
"""

from __future__ import annotations

import warnings

import numpy as np

from scvae_tools.tl._evaluate import _knn_purity
from scvae_tools.tl._integration import (
    AGGREGATES,
    BATCH_METRICS,
    BIO_METRICS,
    _neighbors,
    require_scib,
    scib_scores,
)

N_NEIGHBORS = 15
#: Scores of a single sample, in the order of the tables.
SINGLE_METRICS = ("knn_purity", "leiden_nmi", "leiden_ari", "kmeans_nmi", "kmeans_ari")
#: Scores of several batches, in the order of the tables.
BATCH_SCORES = (*AGGREGATES, *BIO_METRICS, *BATCH_METRICS)


def single_scores(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """kNN purity, Leiden and k-means NMI/ARI of ``labels`` (integer codes) in ``x``."""
    sm = require_scib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leiden = sm.nmi_ari_cluster_labels_leiden(_neighbors(x, N_NEIGHBORS + 1), labels)
        kmeans = sm.nmi_ari_cluster_labels_kmeans(x, labels)
    return {
        "knn_purity": _knn_purity(x, labels, N_NEIGHBORS),
        "leiden_nmi": float(leiden["nmi"]),
        "leiden_ari": float(leiden["ari"]),
        "kmeans_nmi": float(kmeans["nmi"]),
        "kmeans_ari": float(kmeans["ari"]),
    }


def batch_scores(
    x: np.ndarray, labels: np.ndarray, batches: np.ndarray, x_pre: np.ndarray
) -> dict[str, float]:
    """The scIB metrics and totals (see :func:`scvae_tools.tl._integration.scib_scores`)."""
    return scib_scores(x, labels, batches, x_pre)
