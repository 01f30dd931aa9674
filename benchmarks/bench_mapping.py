#!/usr/bin/env python
"""Reference mapping: ``sv.tl.map_query`` against scvi-tools' scArches (``SCVI.load_query_data``).

For every multi-batch set of the registry (``_datasets.py``), one batch is the query and the
others the reference. By default the query is the batch with the most labels that the other
batches lack (on the ``*_partial`` sets, the batch that still has the removed populations), so
that a population absent from the reference is mapped too; ``--query-batch`` picks another.

Methods, each with every seed of ``--seeds``:

- ``sv.tl.<tool>, <likelihood>``: the reference trained with ``batch_key="batch",
  encode_covariates=True, decoder="linear"`` (the reference call the docs recommend;
  ``--decoder`` picks another), the query mapped with ``sv.tl.map_query`` (both at
  ``epochs="auto"``).
- ``scArches (SCVI)``: ``SCVI(encode_covariates=True, use_layer_norm="both",
  use_batch_norm="none", dropout_rate=0.2, n_layers=2)`` on the reference, then
  ``SCVI.load_query_data`` + ``train(plan_kwargs={"weight_decay": 0.0})`` on the query, as
  the scArches tutorial of scvi-tools; both at scvi-tools' own epoch rule.
- ``sv.tl.<tool>, <likelihood>, joint`` (``--joint``): one model on reference and query
  together, the de novo integration that mapping approximates.

Scores: ``label_acc``, the share of query cells whose label the reference has that
``sv.tl.transfer_labels`` (15 neighbours, ``unknown_threshold=0.5``) labels correctly (an
"Unknown" counts as wrong); ``unknown_known``, the share of those labelled "Unknown";
``unknown_absent``, the share of query cells of labels absent from the reference labelled
"Unknown" (empty when there are none); the scIB metrics of reference and query together
(``_scoring.batch_scores``, against the PCA of the joint log-normalised data); ``ref_drift``,
the largest change of a reference cell's code between the reference model and the mapped one
(0 for a frozen reference); and the seconds of the reference and the query training.

    python benchmarks/bench_mapping.py                                # all sets, seeds 0-2
    python benchmarks/bench_mapping.py --sets synthetic --seeds 0 --epochs 1   # smoke check

Needs the ``bench`` extra (scvi-tools, scib-metrics) and, for most sets, ``../shared/data``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import cpu_model, git_commit, log, markdown_table, quiet_scvi, version
from _datasets import DATASETS
from _scoring import batch_scores

SEEDS = (0, 1, 2)
SCIB = ("total", "bio_conservation", "batch_correction")
SCORES = ("label_acc", "unknown_known", "unknown_absent", *SCIB, "ref_drift", "ref_s", "query_s")


def split(adata: Any, query_batch: str) -> tuple[Any, Any, str]:
    """Reference and query cells; ``query_batch="auto"``: the batch with most unique labels."""
    batches = adata.obs["batch"].astype(str)
    labels = adata.obs["label"].astype(str)
    if query_batch == "auto":
        unique = {
            b: len(set(labels[batches == b]) - set(labels[batches != b])) for b in batches.unique()
        }
        query_batch = max(sorted(unique), key=lambda b: unique[b])
    if query_batch not in set(batches):
        raise SystemExit(f"--query-batch {query_batch!r} is not a batch ({sorted(set(batches))})")
    is_query = (batches == query_batch).to_numpy()
    reference, query = adata[~is_query].copy(), adata[is_query].copy()
    for part in (reference, query):
        part.obs["batch"] = part.obs["batch"].astype(str).astype("category")
    return reference, query, query_batch


def ours(
    tool: str, likelihood: str, decoder: str, seed: int, epochs: Any, n_latent: int, ref, query
):
    """Reference model, then ``map_query``: (ref codes, query codes, drift, seconds)."""
    import scvae_tools as sv

    layer = None if likelihood == "gaussian" else "counts"
    common = {"layer": layer, "random_state": seed, "epochs": epochs, "progress": False}
    t0 = time.perf_counter()
    model = getattr(sv.tl, tool)(
        ref,
        likelihood=likelihood,
        batch_key="batch",
        encode_covariates=True,
        decoder=decoder,
        n_latent=n_latent,
        return_model=True,
        key_added="_ref",
        **common,
    )
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extended = sv.tl.map_query(query, model, return_model=True, key_added="_map", **common)
    t2 = time.perf_counter()
    ref_codes = extended.encode(ref, layer=layer)
    drift = float(np.abs(ref_codes - ref.obsm["_ref"]).max())
    return ref_codes, query.obsm["_map"], drift, t1 - t0, t2 - t1


def joint(
    tool: str, likelihood: str, decoder: str, seed: int, epochs: Any, n_latent: int, ref, query
):
    """One model on reference and query together (the de novo integration)."""
    import anndata as ad

    import scvae_tools as sv

    both = ad.concat([ref, query])
    t0 = time.perf_counter()
    getattr(sv.tl, tool)(
        both,
        layer=None if likelihood == "gaussian" else "counts",
        likelihood=likelihood,
        batch_key="batch",
        encode_covariates=True,
        decoder=decoder,
        n_latent=n_latent,
        random_state=seed,
        epochs=epochs,
        progress=False,
        key_added="_joint",
    )
    seconds = time.perf_counter() - t0
    rep = both.obsm["_joint"]
    return rep[: ref.n_obs], rep[ref.n_obs :], float("nan"), seconds, 0.0


def scarches(seed: int, epochs: Any, n_latent: int, ref, query):
    """scvi-tools' scArches: SCVI reference, ``load_query_data``, query training."""
    scvi = quiet_scvi()
    scvi.settings.seed = seed
    reference = ref.copy()
    scvi.model.SCVI.setup_anndata(reference, layer="counts", batch_key="batch")
    arches = {
        "encode_covariates": True,
        "use_layer_norm": "both",
        "use_batch_norm": "none",
        "dropout_rate": 0.2,
        "n_layers": 2,
    }
    train = {
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "logger": False,
        "enable_checkpointing": False,
        **({} if epochs == "auto" else {"max_epochs": int(epochs)}),
    }
    t0 = time.perf_counter()
    model = scvi.model.SCVI(reference, n_latent=n_latent, **arches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**train)
        t1 = time.perf_counter()
        before = model.get_latent_representation(reference)
        mapped = query.copy()
        scvi.model.SCVI.prepare_query_anndata(mapped, model)
        query_model = scvi.model.SCVI.load_query_data(mapped, model)
        query_model.train(plan_kwargs={"weight_decay": 0.0}, **train)
        t2 = time.perf_counter()
        ref_codes = query_model.get_latent_representation(reference)
        query_codes = query_model.get_latent_representation(mapped)
    drift = float(np.abs(ref_codes - before).max())
    return ref_codes, query_codes, drift, t1 - t0, t2 - t1


def score(ref, query, ref_codes, query_codes, pca: np.ndarray) -> dict[str, float]:
    """Label transfer and the scIB metrics of reference and query together."""
    import scvae_tools as sv

    ref.obsm["_rep"], query.obsm["_rep"] = ref_codes, query_codes
    sv.tl.transfer_labels(ref, query, "label", use_rep="_rep", key_added="_pred")
    pred = query.obs["_pred"].astype(str).to_numpy()
    truth = query.obs["label"].astype(str).to_numpy()
    known = np.isin(truth, ref.obs["label"].astype(str).unique())
    x = np.concatenate([ref_codes, query_codes]).astype(np.float32)
    labels = pd.factorize(np.concatenate([ref.obs["label"].astype(str), truth]))[0]
    batches = pd.factorize(
        np.concatenate([ref.obs["batch"].astype(str), query.obs["batch"].astype(str)])
    )[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scib = batch_scores(x, labels, batches, pca)
    return {
        "label_acc": float((pred[known] == truth[known]).mean()) if known.any() else np.nan,
        "unknown_known": float((pred[known] == "Unknown").mean()) if known.any() else np.nan,
        "unknown_absent": float((pred[~known] == "Unknown").mean()) if (~known).any() else np.nan,
        **{k: float(scib[k]) for k in SCIB if k in scib},
    }


def joint_pca(ref, query, n_comps: int = 50) -> np.ndarray:
    import anndata as ad
    import scanpy as sc

    both = ad.concat([ref, query])
    n_comps = min(n_comps, min(both.shape) - 1)
    return np.asarray(sc.pp.pca(both.X, n_comps=n_comps, random_state=0), dtype=np.float64)


def run(args: argparse.Namespace) -> pd.DataFrame:
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    names = args.sets or [n for n, d in DATASETS.items() if d.kind == "batches"]
    for name in names:
        entry = DATASETS[name]
        if not entry.available():
            log(f"{name}: data not found ({entry.needs}), skipped")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = entry.load()
        ref, query, query_batch = split(adata, args.query_batch)
        pca = joint_pca(ref, query)
        log(f"{name}: reference {ref.n_obs} cells, query {query_batch!r} {query.n_obs} cells")
        methods: dict[str, Any] = {}
        for tool in args.tools:
            for lik in args.likelihoods:
                methods[f"sv.tl.{tool}, {lik}"] = (ours, (tool, lik, args.decoder))
                if args.joint:
                    methods[f"sv.tl.{tool}, {lik}, joint"] = (joint, (tool, lik, args.decoder))
        if not args.no_scvi:
            methods["scArches (SCVI)"] = (scarches, ())
        for method, (fn, extra) in methods.items():
            for seed in args.seeds:
                r, q = ref.copy(), query.copy()
                codes = fn(*extra, seed, args.epochs, args.n_latent, r, q)
                ref_codes, query_codes, drift, ref_s, query_s = codes
                row = {"set": name, "query_batch": query_batch, "method": method, "seed": seed}
                row.update(score(r, q, ref_codes, query_codes, pca))
                row.update({"ref_drift": drift, "ref_s": ref_s, "query_s": query_s})
                rows.append(row)
                log(
                    f"  {method} seed {seed}: label_acc {row['label_acc']:.3f}, "
                    f"total {row.get('total', np.nan):.3f}, drift {drift:.2g}, "
                    f"{ref_s:.1f} + {query_s:.1f} s"
                )
    return pd.DataFrame(rows)


def report(rows: pd.DataFrame, args: argparse.Namespace) -> str:
    lines = [
        "# Reference mapping",
        "",
        f"Commit {git_commit()}, {cpu_model()}, {args.threads} thread(s); scvae-tools "
        f"{version('scvae-tools')}, scvi-tools {version('scvi-tools')}. Seeds "
        f"{', '.join(map(str, args.seeds))}; epochs {args.epochs}; n_latent {args.n_latent}; our "
        f"decoder {args.decoder!r}. "
        "Means over seeds (min-max).",
    ]
    for name, part in rows.groupby("set", sort=False):
        lines += ["", f"## {name} (query: {part['query_batch'].iloc[0]})", ""]
        table = []
        for method, group in part.groupby("method", sort=False):
            cells = []
            for col in SCORES:
                values = group[col].dropna() if col in group else pd.Series(dtype=float)
                if values.empty:
                    cells.append("")
                elif len(values) == 1:
                    cells.append(f"{values.iloc[0]:.3g}")
                else:
                    cells.append(f"{values.mean():.3g} ({values.min():.3g}-{values.max():.3g})")
            table.append([method, *cells])
        lines.append(markdown_table(["method", *SCORES], table))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    batch_sets = [n for n, d in DATASETS.items() if d.kind == "batches"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=batch_sets, help="default: all of them")
    parser.add_argument("--query-batch", default="auto", help="the query's batch (auto)")
    parser.add_argument("--tools", nargs="+", choices=("ae", "vae", "vsc"), default=["vae"])
    parser.add_argument(
        "--likelihoods", nargs="+", choices=("gaussian", "nb", "zinb"), default=["nb"]
    )
    parser.add_argument(
        "--decoder",
        choices=("linear", "auto", "shallow", "mlp"),
        default="linear",
        help="decoder of our reference (and joint) models (linear, the recommended reference)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument(
        "--epochs",
        default="auto",
        type=lambda v: v if v == "auto" else int(v),
        help="epochs of every training, reference and query ('auto': each method's own rule)",
    )
    parser.add_argument("--n-latent", type=int, default=10, help="for every method (10)")
    parser.add_argument("--joint", action="store_true", help="also train ours on both at once")
    parser.add_argument("--no-scvi", action="store_true", help="skip scArches (SCVI)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, help="also write every run's scores here")
    parser.add_argument("--output", type=Path, help="also write the report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    rows = run(args)
    if rows.empty:
        raise SystemExit("No data set could be loaded.")
    text = report(rows, args)
    print(text)
    if args.csv:
        rows.to_csv(args.csv, index=False)
    if args.output:
        args.output.write_text(text)
    return rows


if __name__ == "__main__":
    main()
