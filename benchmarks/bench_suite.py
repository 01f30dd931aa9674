#!/usr/bin/env python
"""The benchmark suite: every data set of the registry, every model, several training seeds.

Single samples (``_datasets.py``, kind "single"): the three tools' default calls against PCA
with as many dimensions, and PCA 10 / 50, scored by kNN purity and Leiden / k-means NMI and ARI
of the labels. Several batches (kind "batches"): the three tools with ``batch_key``, each with
the Gaussian likelihood on the log-normalised data and NB and ZINB on the counts, against PCA,
Harmony (harmonypy, on PCA 10 and on PCA 50) and scVI (scvi-tools, its own defaults), scored by
the scIB metrics (scib-metrics). Every seeded method runs with each of ``--seeds``; the tables
give the mean and the range over seeds, the targets are checked on the means, and one summary
line per model aggregates all sets.

    python benchmarks/bench_suite.py --tier quick         # under 20 minutes on 2 cores
    python benchmarks/bench_suite.py                      # the full tier
    python benchmarks/bench_suite.py --sets mesc celseq2 --set beta=1   # a candidate

Needs the ``bench`` extra (scvi-tools, harmonypy, scib-metrics) and ``../shared/data``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import cpu_model, git_commit, loadavg, log, markdown_table, version
from _datasets import DATASETS
from _scoring import SINGLE_METRICS, batch_scores, single_scores

TOOLS = ("ae", "vae", "vsc")
LIKELIHOODS = ("gaussian", "nb", "zinb")
SEEDS = (0, 1, 2)
#: Margin of the single-sample target: every model >= PCA with as many dimensions - 0.01.
SINGLE_MARGIN = 0.01
#: The data sets and our configurations of each tier (None: all).
TIERS: dict[str, dict[str, Any]] = {
    # The quick tier: two single samples, two multi-batch sets (one with partial overlap), the
    # Gaussian only, all three seeds; timed at under 20 minutes on 2 cores (suite page).
    "quick": {
        "sets": ["pbmc68k_reduced", "sortseq", "mesc", "cellbench_partial"],
        "likelihoods": ("gaussian",),
    },
    "full": {"sets": None, "likelihoods": LIKELIHOODS},
}


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One row of a table: how to embed a data set, and whether it is ours or a baseline."""

    name: str
    ours: bool
    seeded: bool
    embed: Callable[..., np.ndarray]
    #: For ours: the tool and its likelihood.
    tool: str | None = None
    likelihood: str | None = None


def _ours(tool: str, likelihood: str, batch_key: str | None) -> Callable[..., np.ndarray]:
    def embed(adata: Any, seed: int, options: dict[str, Any]) -> np.ndarray:
        import scvae_tools as sv

        getattr(sv.tl, tool)(
            adata,
            layer=None if likelihood == "gaussian" else "counts",
            likelihood=likelihood,
            batch_key=batch_key,
            random_state=seed,
            progress=False,
            key_added="_suite",
            **options,
        )
        adata.uns.pop("_suite")
        adata.obsm.pop("_suite_spike", None)
        return adata.obsm.pop("_suite")

    return embed


def _pca(n_comps: int) -> Callable[..., np.ndarray]:
    def embed(adata: Any, seed: int, options: dict[str, Any]) -> np.ndarray:
        return pca_of(adata.uns["_suite_name"], n_comps)

    return embed


def _harmony(n_comps: int) -> Callable[..., np.ndarray]:
    def embed(adata: Any, seed: int, options: dict[str, Any]) -> np.ndarray:
        import harmonypy

        result = harmonypy.run_harmony(
            pca_of(adata.uns["_suite_name"], n_comps),
            adata.obs,
            "batch",
            random_state=seed,
            verbose=False,
        )
        z = np.asarray(result.Z_corr)
        return z if z.shape[0] == adata.n_obs else z.T

    return embed


def _scvi(adata: Any, seed: int, options: dict[str, Any]) -> np.ndarray:
    """scvi-tools' SCVI at its own defaults (ZINB, 10 latent dimensions, its epoch rule)."""
    from _common import quiet_scvi

    scvi = quiet_scvi()
    scvi.settings.seed = seed
    data = adata.copy()
    scvi.model.SCVI.setup_anndata(data, layer="counts", batch_key="batch")
    model = scvi.model.SCVI(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(
            accelerator="cpu",
            enable_progress_bar=False,
            logger=False,
            enable_checkpointing=False,
            **({"max_epochs": options["smoke_epochs"]} if "smoke_epochs" in options else {}),
        )
    return model.get_latent_representation()


def methods(
    kind: str, likelihoods: tuple[str, ...], n_latent: int, tools: tuple[str, ...] = TOOLS
) -> list[Method]:
    """The rows of a data set of ``kind``: ours first, then the baselines."""
    if kind == "single":
        ours = [Method(f"sv.tl.{t}", True, True, _ours(t, "gaussian", None), t) for t in tools]
        dims = sorted({n_latent, 10, 50})
        return ours + [Method(f"PCA {d}", False, False, _pca(d)) for d in dims]
    ours = [
        Method(f"sv.tl.{t}, {lik}", True, True, _ours(t, lik, "batch"), t, lik)
        for lik in likelihoods
        for t in tools
    ]
    return [
        *ours,
        Method("PCA 10", False, False, _pca(10)),
        Method("PCA 50", False, False, _pca(50)),
        Method("Harmony (PCA 10)", False, True, _harmony(10)),
        Method("Harmony (PCA 50)", False, True, _harmony(50)),
        Method("scVI", False, True, _scvi),
    ]


# --------------------------------------------------------------------------------------------
# Jobs (run in worker processes; each caches the data sets it has loaded)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def dataset(name: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = DATASETS[name].load()
    adata.uns["_suite_name"] = name
    return adata


@lru_cache(maxsize=16)
def pca_of(name: str, n_comps: int) -> np.ndarray:
    """PCA of the set's ``X`` (scanpy, seed 0): the baseline, and scIB's unintegrated input."""
    import scanpy as sc

    adata = dataset(name)
    n_comps = min(n_comps, min(adata.shape) - 1)
    return np.asarray(sc.pp.pca(adata.X, n_comps=n_comps, random_state=0), dtype=np.float64)


def _codes(values: Any) -> np.ndarray:
    return pd.factorize(np.asarray(values).astype(str))[0]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Embed one data set with one method and seed, and score it."""
    import torch

    torch.set_num_threads(job["threads"])
    name = job["set"]
    adata = dataset(name)
    entry = DATASETS[name]
    method = {m.name: m for m in methods(entry.kind, LIKELIHOODS, job["n_latent"])}[job["method"]]
    options = dict(job["options"]) if method.ours else {}
    if job.get("smoke_epochs"):
        options["epochs"] = job["smoke_epochs"]
        if method.name == "scVI":
            options = {"smoke_epochs": job["smoke_epochs"]}
    work = adata.copy() if method.ours else adata
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = np.asarray(method.embed(work, job["seed"], options), dtype=np.float64)
    seconds = time.perf_counter() - start
    labels = _codes(adata.obs["label"])
    if entry.kind == "single":
        scores = single_scores(x, labels)
    else:
        scores = batch_scores(x, labels, _codes(adata.obs["batch"]), pca_of(name, 50))
    return {**{k: job[k] for k in ("set", "method", "seed")}, **scores, "seconds": seconds}


def _limit_threads(threads: int) -> None:
    """Keep every library of a worker to ``threads`` threads.

    Oversubscribed cores slow torch's training steps several-fold (its OpenMP threads wait
    for each other), and the scoring libraries start pools of their own: XLA (scib-metrics'
    jax), numba (scanpy) and OpenBLAS read these variables when they first load, so they are
    set in the parent, whose spawned workers inherit them before they import anything (numba
    refuses a change of its own variable once loaded, so it is left alone). Lightning (scVI)
    may reset torch's count: run_job sets it again.
    """
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ["XLA_FLAGS"] = (
        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=" + str(threads)
    )


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")


def _source_hash() -> str:
    """A hash of the package's source files: a cached result of ours is stale once it changes."""
    import scvae_tools

    root = Path(scvae_tools.__file__).parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _job_key(job: dict[str, Any], ours: bool, source: str) -> str:
    fields = {k: job[k] for k in ("set", "method", "seed", "n_latent", "smoke_epochs")}
    fields["versions"] = source if ours else [version(p) for p in ("scvi-tools", "harmonypy")]
    if ours:
        fields["options"] = job["options"]
    fields["scores"] = version("scib-metrics")
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def run_jobs(jobs: list[dict[str, Any]], n_workers: int, cache: Path | None) -> pd.DataFrame:
    source = _source_hash()
    done: list[dict[str, Any]] = []
    todo: list[tuple[dict[str, Any], Path | None]] = []
    for job in jobs:
        path = None
        if cache is not None:
            ours = job["method"].startswith("sv.tl.")
            path = cache / f"{_job_key(job, ours, source)}.json"
            if path.exists():
                done.append({**json.loads(path.read_text()), "cached": True})
                continue
        todo.append((job, path))
    log(f"{len(jobs)} jobs: {len(done)} from the cache, {len(todo)} to run on {n_workers} workers")
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    todo = [({**job, "threads": threads}, path) for job, path in todo]
    finished = 0
    if n_workers == 1:
        results = ((run_job(job), path) for job, path in todo)
        pool = None
    else:
        # Spawned, not forked: each worker starts its libraries' thread pools afresh, under
        # the limits set here, before it imports anything.
        _limit_threads(threads)
        pool = ProcessPoolExecutor(
            n_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads,),
        )
        futures = [(pool.submit(run_job, job), path) for job, path in todo]
        results = ((future.result(), path) for future, path in futures)
    try:
        for row, path in results:
            finished += 1
            log(
                f"[{finished}/{len(todo)}] {row['set']}: {row['method']} seed {row['seed']} "
                f"({row['seconds']:.0f} s)"
            )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(row))
            done.append({**row, "cached": False})
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return pd.DataFrame(done)


def make_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    jobs = []
    for name in args.sets:
        entry = DATASETS[name]
        for method in methods(entry.kind, args.likelihoods, args.n_latent, args.tools):
            for seed in args.seeds if method.seeded else args.seeds[:1]:
                jobs.append(
                    {
                        "set": name,
                        "method": method.name,
                        "seed": seed,
                        "n_latent": args.n_latent,
                        "options": args.options,
                        "smoke_epochs": args.smoke_epochs,
                    }
                )
    # The longest jobs first, so that the workers finish together.
    return sorted(jobs, key=lambda j: (not j["method"].startswith(("sv.tl.", "scVI")),))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    mean = values.mean()
    if len(values) == 1 or values.max() - values.min() < 5e-4:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({values.min():.3f}-{values.max():.3f})"


def means(rows: pd.DataFrame) -> pd.DataFrame:
    """The mean over seeds of every score, one row per set and method."""
    cols = [c for c in rows.columns if c not in ("set", "method", "seed", "cached")]
    return rows.groupby(["set", "method"], sort=False)[cols].mean()


def set_table(name: str, rows: pd.DataFrame, kind: str) -> list[str]:
    cols = (
        SINGLE_METRICS
        if kind == "single"
        else ("total", "bio_conservation", "batch_correction", "kmeans_nmi")
    )
    header = ["method", *cols, "s"]
    body = []
    for method, group in rows.groupby("method", sort=False):
        body.append([method, *(_cell(group[c]) for c in cols), f"{group['seconds'].mean():.0f}"])
    key = cols[0]
    body.sort(key=lambda r: -float(r[1].split()[0]) if r[1] != "n/a" else math.inf)
    entry = DATASETS[name]
    n_seeds = rows.loc[rows["method"].str.startswith("sv.tl."), "seed"].nunique()
    title = f"**{name}**: {entry.description} (scores: mean (range) over {n_seeds} seeds)"
    del key
    return [title, "", markdown_table(header, body), ""]


def single_targets(table: pd.DataFrame, n_latent: int) -> dict[str, dict[str, float]]:
    """Per set and model: the gaps to PCA with as many dimensions (kNN purity, Leiden NMI)."""
    out: dict[str, dict[str, float]] = {}
    for (name, method), row in table.iterrows():
        if not method.startswith("sv.tl."):
            continue
        pca = table.loc[(name, f"PCA {n_latent}")]
        out.setdefault(method, {})[name] = min(
            row["knn_purity"] - pca["knn_purity"], row["leiden_nmi"] - pca["leiden_nmi"]
        )
    return out


def batch_targets(table: pd.DataFrame) -> dict[str, dict[str, tuple[float, float]]]:
    """Per set and configuration: (total - scVI's, bio - scVI's)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for (name, method), row in table.iterrows():
        if not method.startswith("sv.tl."):
            continue
        scvi = table.loc[(name, "scVI")]
        out.setdefault(method, {})[name] = (
            row["total"] - scvi["total"],
            row["bio_conservation"] - scvi["bio_conservation"],
        )
    return out


def report(rows: pd.DataFrame, args: argparse.Namespace, started: str) -> str:
    import torch

    cached = f"; {int(rows['cached'].sum())} of {len(rows)} jobs from the cache"
    lines = [
        f"## scvae-tools benchmark suite ({started}, tier {args.tier})",
        "",
        f"- git {git_commit()}; scvae-tools {version('scvae-tools')}, scvi-tools "
        f"{version('scvi-tools')}, harmonypy {version('harmonypy')}, scib-metrics "
        f"{version('scib-metrics')}, scanpy {version('scanpy')}, torch {torch.__version__}",
        f"- {cpu_model()}, {os.cpu_count()} cores, {args.jobs} worker process(es); load "
        f"average at start {args.load}; seconds (`s`) are each job's wall time with the workers "
        "sharing the cores: a quality run, not a timing benchmark",
        f"- training seeds {list(args.seeds)}; our options "
        f"{json.dumps(args.options) if args.options else 'the defaults'}"
        + (f"; SMOKE RUN: {args.smoke_epochs} epochs" if args.smoke_epochs else "")
        + (cached if args.cache else ""),
        "",
    ]
    table = means(rows)
    for kind, heading in (("single", "Single samples"), ("batches", "Several batches")):
        names = [n for n in args.sets if DATASETS[n].kind == kind]
        if not names:
            continue
        lines += [f"### {heading}", ""]
        for name in names:
            lines += set_table(name, rows[rows["set"] == name], kind)
    lines += ["### Summary", ""]
    singles = [n for n in args.sets if DATASETS[n].kind == "single"]
    if singles:
        gaps = single_targets(table.loc[singles], args.n_latent)
        held = [n for n in singles if not DATASETS[n].labels_from_pca]
        lines += [
            f"Single samples: min(kNN purity, Leiden NMI) minus PCA {args.n_latent}'s, mean over "
            f"seeds; the target is >= -{SINGLE_MARGIN} on the sets whose labels no PCA "
            f"produced ({', '.join(held) or 'none here'}).",
            "",
        ]
        body = []
        for method, by_set in gaps.items():
            on_held = [by_set[n] for n in held]
            body.append(
                [
                    method,
                    f"{np.mean(list(by_set.values())):+.3f}",
                    f"{min(by_set.values()):+.3f}",
                    f"{sum(g >= -SINGLE_MARGIN for g in on_held)}/{len(on_held)}",
                    " ".join(f"{n} {g:+.3f}" for n, g in by_set.items()),
                ]
            )
        header = ["model", "mean gap", "worst gap", "targets met", "per set"]
        lines += [markdown_table(header, body, "lrrrl"), ""]
    multi = [n for n in args.sets if DATASETS[n].kind == "batches"]
    if multi:
        sub = table.loc[multi]
        gaps = batch_targets(sub)
        ranks = sub["total"].groupby(level="set").rank(ascending=False)
        lines += [
            "Several batches: scIB total and bio conservation minus scVI's, means over seeds; "
            "targets: both >= 0 for every VAE and VSC, and the best of ours >= Harmony's "
            "(the better of its two rows). Rank: mean rank of the total among all rows.",
            "",
        ]
        body = []
        for method, by_set in gaps.items():
            totals = [g[0] for g in by_set.values()]
            bios = [g[1] for g in by_set.values()]
            met = sum(t >= 0 and b >= 0 for t, b in by_set.values())
            body.append(
                [
                    method,
                    f"{np.mean(totals):+.3f}",
                    f"{min(totals):+.3f}",
                    f"{np.mean(bios):+.3f}",
                    f"{min(bios):+.3f}",
                    f"{met}/{len(by_set)}",
                    f"{ranks.xs(method, level='method').mean():.1f}",
                ]
            )
        for base in ("scVI", "Harmony (PCA 10)", "Harmony (PCA 50)", "PCA 10"):
            body.append([base, "", "", "", "", "", f"{ranks.xs(base, level='method').mean():.1f}"])
        header = ["method", "total gap", "worst", "bio gap", "worst", "targets met", "rank"]
        lines += [markdown_table(header, body, "lrrrrrr"), ""]
        best = []
        for name in multi:
            part = sub.loc[name]
            ours = part[part.index.str.startswith("sv.tl.")]["total"]
            harmony = part.loc[["Harmony (PCA 10)", "Harmony (PCA 50)"], "total"].max()
            best.append(
                f"{name} {ours.idxmax()} {ours.max():.3f} vs {harmony:.3f} "
                + ("yes" if ours.max() >= harmony else "NO")
            )
        lines += ["Best of ours against Harmony: " + "; ".join(best) + ".", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=tuple(TIERS), default="full")
    parser.add_argument("--sets", nargs="+", choices=tuple(DATASETS), help="instead of the tier's")
    parser.add_argument("--likelihoods", nargs="+", choices=LIKELIHOODS)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--n-latent", type=int, default=6, help="our tools' default")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option for every call of ours (JSON value), e.g. --set beta=1",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--cache", type=Path, help="reuse results of unchanged jobs from here")
    parser.add_argument("--csv", type=Path, help="also write every job's scores here")
    parser.add_argument("--output", type=Path, help="also write the report here")
    parser.add_argument(
        "--smoke-epochs", type=int, default=None, help="train this many epochs (tests only)"
    )
    args = parser.parse_args(argv)
    tier = TIERS[args.tier]
    args.sets = args.sets or [n for n in (tier["sets"] or DATASETS)]
    missing = [n for n in args.sets if not DATASETS[n].available()]
    if missing:
        parser.error(f"data not found for {missing}: ../shared/data must lie beside the clone")
    args.likelihoods = tuple(args.likelihoods or tier["likelihoods"])
    args.tools = tuple(args.tools)
    args.options = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    args.load = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    rows = run_jobs(make_jobs(args), args.jobs, args.cache)
    text = report(rows, args, started)
    text += f"\nWall time of the run: {(time.perf_counter() - t0) / 60:.1f} min.\n"
    print(text, flush=True)
    if args.output:
        args.output.write_text(text)
    if args.csv:
        rows.to_csv(args.csv, index=False)
    return rows


if __name__ == "__main__":
    main()
