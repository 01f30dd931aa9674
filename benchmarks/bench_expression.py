#!/usr/bin/env python
"""Expression read off the decoders: denoising, differential expression, gene programs.

Three parts, each against baselines run in the same process:

**mcv** (molecular cross-validation, Batson et al. 2019). The counts of each data set are split
binomially, ``x = x_train + x_test`` with ``x_train ~ Binomial(x, 1/2)``. Every method sees
``x_train`` only and gives each cell's expression proportions ``rho`` (rows sum to 1); the score
is the Poisson loss of the held-out half, ``sum_g (mu_g - x_test,g log mu_g)`` with
``mu = rho * sum_g x_test,g`` (the observed total of the other half), averaged over cells, lower
is better (the ``log x!`` term is the same for every method and is left out). Methods:
``sv.tl.vae`` / ``ae`` / ``vsc`` with ``likelihood="nb"`` (:meth:`LatentModel.
normalized_expression`), the same VAE with the docs' expression recipe
(``decoder="shallow", hidden=(128,), batch_size=128``: "recipe"), ``sv.tl.vae`` with the
Gaussian on log-normalised ``x_train`` (``expm1`` of the reconstruction, renormalised),
scvi-tools' SCVI (NB, ``get_normalized_expression(library_size=1)``), the raw proportions of
``x_train`` (with a pseudocount of 0.5 per gene, else a zero meets a held-out count at
``log 0``), and PCA
reconstructions of the log-normalised ``x_train`` (10 and 30 components, ``expm1``, clipped at
0, renormalised).

**de**. Calibration: the largest labelled population of ``x_train`` is split into random halves
(``--de-splits`` times), and each method's number of genes called is reported (sv: ``is_de`` at
FDR 0.05; scVI: ``"change"`` mode, ``is_de_fdr_0.05``; Wilcoxon: scanpy's ``pvals_adj < 0.05``):
every call is false. Agreement: for the ``--de-groups`` largest labels, each against the rest,
the overlap of each method's top ``--top`` up-regulated genes on ``x_train`` with the top genes
of a Wilcoxon test on the held-out ``x_test`` (log-normalised), the reference no method saw.
The models rank by ``sign(lfc) * prob_de`` then ``lfc`` (as ``sv.tl.rank_genes_groups``).
The two halves hold the same cells, so the Wilcoxon test of the training half (reported too)
shares the cells' biological variation with the reference: it is an upper reference, not a
method to beat. The genes each method calls in those comparisons are reported too (a method
that calls nothing is calibrated but of no use).

**programs**. Synthetic counts driven by ``--programs`` sparse programs of 20 genes each
(active in a cell with probability 0.3, log-scale strength Gamma(4, 0.5)). ``sv.tl.vsc`` and
``sv.tl.vae`` with ``decoder="linear"`` (``sv.tl.gene_programs``) against scvi-tools'
LinearSCVI (``get_loadings``), with as many latent dimensions as programs; both loadings are
centred per dimension on their median over genes and ranked by absolute value. Score: the
programs matched one-to-one to dimensions (Hungarian, on the overlap of each dimension's top 20
genes with each program), the mean share of a program's 20 genes in its dimension's top 20.

**memory**. In a fresh process, as ``bench_training.py``'s memory section: a synthetic
200,000 x 20,000 CSR of counts (1,000 non-zeros per cell, values 1-20; ``--mem-shape``), an NB
VAE trained on it for one epoch, then ``model.normalized_expression`` of 100 genes for every
cell, ``sv.tl.normalized_expression`` of all genes (which must refuse, naming the size, rather
than fill the memory: 16 GB dense), and ``model.differential_expression`` of one of three
random groups against the rest. Peak RSS of each step, against the bound of
``bench_training.py``: the CSR's size + 1.5 GB.

    python benchmarks/bench_expression.py                          # all parts, default sets
    python benchmarks/bench_expression.py --parts mcv --sets cellbench --seeds 0 1 2
    python benchmarks/bench_expression.py --epochs 1 --sets pbmc3k_300 --de-splits 1 \
        --de-groups 2 --programs 3                 # smoke check, ~45 s on 2 cores

Needs the ``bench`` extra (scvi-tools) unless ``--no-scvi``, and ``../shared/data`` for the
real sets. Every model (ours and scvi-tools') trains for ``--epochs`` (default 200) on all
cells, without early stopping, and at its defaults otherwise; on a set of several batches
(``cellbench``: CEL-seq2 and SORT-seq) with ``batch_key="batch"``, ours and scVI alike.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from _common import cpu_model, git_commit, log, markdown_table, quiet_scvi, version
from _datasets import DATASETS
from scipy.optimize import linear_sum_assignment

import scvae_tools as sv

PARTS = ("mcv", "de", "programs", "memory")
DEFAULT_SETS = ("pbmc3k", "cellbench")
FDR = 0.05


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def binomial_split(counts: sp.csr_matrix, seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """``(x_train, x_test)``: ``x_train ~ Binomial(x, 1/2)`` entrywise, ``x_test = x - x_train``."""
    counts = sp.csr_matrix(counts)
    values = np.rint(counts.data).astype(np.int64)
    train_values = np.random.default_rng(seed).binomial(values, 0.5)
    train = sp.csr_matrix(
        (train_values.astype(np.float32), counts.indices, counts.indptr), shape=counts.shape
    )
    test = sp.csr_matrix(
        ((values - train_values).astype(np.float32), counts.indices, counts.indptr),
        shape=counts.shape,
    )
    train.eliminate_zeros()
    test.eliminate_zeros()
    return train, test


def half(adata: sc.AnnData, counts: sp.csr_matrix) -> sc.AnnData:
    """An AnnData of one half: ``X`` the counts, ``layers["log"]`` log1p(normalize_total 1e4)."""
    keep = [c for c in ("label", "batch") if c in adata.obs]
    out = sc.AnnData(counts.copy(), obs=adata.obs[keep].copy(), var=adata.var[[]].copy())
    out.layers["counts"] = counts.copy()
    logged = out.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    out.layers["log"] = sp.csr_matrix(logged.X, dtype=np.float32)
    return out


def load_set(name: str, seed: int) -> tuple[sc.AnnData, sc.AnnData]:
    """The training and held-out halves of a registered data set's counts."""
    entry = DATASETS[name]
    if not entry.available():
        raise SystemExit(f"data set {name!r} needs {entry.needs}")
    adata = entry.load()
    if "counts" not in adata.layers:
        raise SystemExit(f"data set {name!r} has no raw counts (layers['counts']).")
    train, test = binomial_split(adata.layers["counts"], seed)
    return half(adata, train), half(adata, test)


# --------------------------------------------------------------------------------------------
# Molecular cross-validation
# --------------------------------------------------------------------------------------------


def poisson_loss(test: sp.csr_matrix, proportions: np.ndarray) -> float:
    """Mean over cells of ``sum_g mu_g - x_g log mu_g``, ``mu = rho * total(x_test)``."""
    rho = np.asarray(proportions, dtype=np.float64)
    rho = rho / rho.sum(1, keepdims=True)
    totals = np.asarray(test.sum(1)).ravel()
    mu = np.maximum(rho * totals[:, None], 1e-12)
    coo = test.tocoo()
    log_term = float((coo.data * np.log(mu[coo.row, coo.col])).sum())
    return (float(mu.sum()) - log_term) / test.shape[0]


def pca_proportions(log_x: sp.csr_matrix, n_comps: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    dense = log_x.toarray()
    pca = PCA(n_components=min(n_comps, min(dense.shape) - 1), random_state=seed)
    recon = pca.inverse_transform(pca.fit_transform(dense))
    return np.maximum(np.expm1(np.clip(recon, 0.0, None)), 0.0) + 1e-8


def batch_key(adata: sc.AnnData) -> str | None:
    """``"batch"`` on a set of several batches: every model, ours and scVI, is batch-aware."""
    if "batch" in adata.obs and adata.obs["batch"].nunique() > 1:
        return "batch"
    return None


def scvi_model(train: sc.AnnData, epochs: int, n_latent: int, seed: int, linear: bool = False):
    scvi = quiet_scvi()
    scvi.settings.seed = seed
    data = train.copy()
    cls = scvi.model.LinearSCVI if linear else scvi.model.SCVI
    cls.setup_anndata(data, layer="counts", batch_key=batch_key(data))
    model = cls(data, n_latent=n_latent, gene_likelihood="nb")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(
            max_epochs=epochs,
            train_size=1.0,
            early_stopping=False,
            enable_progress_bar=False,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
        )
    return model, data


#: The expression recipe the docs give for one sample: scVI's shape, one hidden layer of 128 in
#: the encoder and the decoder, minibatches of 128.
EXPRESSION_RECIPE = {"decoder": "shallow", "hidden": (128,), "batch_size": 128}


def sv_model(
    train: sc.AnnData,
    tool: str,
    likelihood: str,
    epochs: int,
    n_latent: int,
    seed: int,
    **options: Any,
):
    layer = None if likelihood != "gaussian" else "log"
    return getattr(sv.tl, tool)(
        train.copy(),
        likelihood=likelihood,
        layer=layer,
        n_latent=n_latent,
        batch_key=batch_key(train),
        epochs=epochs,
        random_state=seed,
        progress=False,
        return_model=True,
        **options,
    )


def mcv_methods(train: sc.AnnData, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Each method's proportions of ``train``'s cells, as a function to time."""

    def nb(tool: str, **options: Any) -> np.ndarray:
        model = sv_model(train, tool, "nb", args.epochs, args.n_latent, seed, **options)
        return model.normalized_expression(train)

    def gaussian() -> np.ndarray:
        model = sv_model(train, "vae", "gaussian", args.epochs, args.n_latent, seed)
        recon = model.normalized_expression(train, layer="log")
        return np.maximum(np.expm1(np.clip(recon, 0.0, None)), 0.0) + 1e-8

    def scvi_rho() -> np.ndarray:
        model, data = scvi_model(train, args.epochs, args.n_latent, seed)
        return np.asarray(model.get_normalized_expression(data, library_size=1.0))

    methods: dict[str, Any] = {f"sv.{tool} nb": partial(nb, tool) for tool in ("vae", "ae", "vsc")}
    methods["sv.vae nb, recipe"] = partial(nb, "vae", **EXPRESSION_RECIPE)
    methods["sv.vae gaussian"] = gaussian
    if args.scvi:
        methods["scVI nb"] = scvi_rho
    methods["raw + 0.5"] = lambda: train.X.toarray() + 0.5
    for k in (10, 30):
        methods[f"PCA {k}"] = partial(pca_proportions, train.layers["log"], k, seed)
    return methods


def run_mcv(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for seed in args.seeds:
        train, test = load_set(name, seed)
        log(f"mcv {name} seed {seed}: {train.n_obs} cells x {train.n_vars} genes")
        for method, fn in mcv_methods(train, args, seed).items():
            start = time.perf_counter()
            rho = fn()
            rows.append(
                {
                    "set": name,
                    "seed": seed,
                    "method": method,
                    "poisson_loss": poisson_loss(test.X, rho),
                    "seconds": time.perf_counter() - start,
                }
            )
            log(f"  {method}: {rows[-1]['poisson_loss']:.3f} ({rows[-1]['seconds']:.1f} s)")
    return rows


# --------------------------------------------------------------------------------------------
# Differential expression
# --------------------------------------------------------------------------------------------


def top_up(names: pd.Index, lfc: np.ndarray, prob: np.ndarray, n: int) -> list[str]:
    score = np.sign(lfc) * prob
    order = np.lexsort((-lfc, -score))
    keep = [i for i in order if lfc[i] > 0][:n]
    return [str(names[i]) for i in keep]


def wilcoxon(adata: sc.AnnData, groupby: str, group: str, reference: str = "rest"):
    sc.tl.rank_genes_groups(
        adata,
        groupby,
        groups=[group],
        reference=reference,
        method="wilcoxon",
        layer="log",
        key_added="_w",
    )
    return sc.get.rank_genes_groups_df(adata, group, key="_w")


def run_de(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for seed in args.seeds:
        train, test = load_set(name, seed)
        sizes = train.obs["label"].value_counts()
        model = sv_model(train, "vae", "nb", args.epochs, args.n_latent, seed)
        scvi = scvi_model(train, args.epochs, args.n_latent, seed) if args.scvi else None
        # Calibration: random halves of the largest population.
        biggest = str(sizes.index[0])
        cells = train[train.obs["label"].astype(str) == biggest].copy()
        rng = np.random.default_rng(seed)
        for split in range(args.de_splits):
            cells.obs["half"] = pd.Categorical(rng.integers(0, 2, cells.n_obs).astype(str))
            calls = {
                "sv.vae nb": int(
                    model.differential_expression(cells, "half", "0", "1", random_state=split)[
                        "is_de"
                    ].sum()
                )
            }
            if scvi is not None:
                m, _ = scvi
                data = cells.copy()
                m.__class__.setup_anndata(data, layer="counts", batch_key=batch_key(train))
                table = m.differential_expression(
                    data, groupby="half", group1="0", group2="1", mode="change", delta=0.25
                )
                calls["scVI nb"] = int(table[f"is_de_fdr_{FDR}"].sum())
            w = wilcoxon(cells, "half", "0", "1")
            calls["Wilcoxon"] = int((w["pvals_adj"] < FDR).sum())
            for method, n in calls.items():
                rows.append(
                    {
                        "set": name,
                        "seed": seed,
                        "part": "calibration",
                        "split": split,
                        "population": biggest,
                        "n_cells": cells.n_obs,
                        "method": method,
                        "genes_called": n,
                        "n_genes": cells.n_vars,
                    }
                )
            log(f"de {name} calibration split {split} ({cells.n_obs} cells): {calls}")
        # Agreement with a Wilcoxon test on the held-out half.
        for group in map(str, sizes.index[: args.de_groups]):
            held = wilcoxon(test, "label", group)
            reference = set(held.loc[held["logfoldchanges"] > 0, "names"][: args.top])
            tops, called = {}, {}
            table = model.differential_expression(train, "label", group, random_state=seed)
            tops["sv.vae nb"] = top_up(
                table.index, table["lfc_mean"].to_numpy(), table["prob_de"].to_numpy(), args.top
            )
            called["sv.vae nb"] = int(table["is_de"].sum())
            if scvi is not None:
                m, data = scvi
                t = m.differential_expression(
                    data, groupby="label", group1=group, mode="change", delta=0.25
                )
                t = t.reindex(train.var_names)
                tops["scVI nb"] = top_up(
                    t.index, t["lfc_mean"].to_numpy(), t["proba_de"].to_numpy(), args.top
                )
                called["scVI nb"] = int(t[f"is_de_fdr_{FDR}"].sum())
            same = wilcoxon(train, "label", group)
            tops["Wilcoxon (train half)"] = list(
                same.loc[same["logfoldchanges"] > 0, "names"][: args.top]
            )
            called["Wilcoxon (train half)"] = int((same["pvals_adj"] < FDR).sum())
            for method, genes in tops.items():
                rows.append(
                    {
                        "set": name,
                        "seed": seed,
                        "part": "agreement",
                        "group": group,
                        "method": method,
                        "overlap": len(set(genes) & reference) / max(len(reference), 1),
                        "genes_called": called[method],
                    }
                )
            log(
                f"de {name} {group}: "
                + ", ".join(f"{m} {len(set(g) & reference)}" for m, g in tops.items())
            )
    return rows


# --------------------------------------------------------------------------------------------
# Gene programs
# --------------------------------------------------------------------------------------------


def planted_programs(n_programs: int, seed: int, n_cells: int = 3000, n_genes: int = 500):
    rng = np.random.default_rng(seed)
    strength = (rng.random((n_cells, n_programs)) < 0.3) * rng.gamma(
        4.0, 0.5, (n_cells, n_programs)
    )
    loadings = np.zeros((n_programs, n_genes))
    for k in range(n_programs):
        loadings[k, 20 * k : 20 * k + 20] = 1.0
    log_base = np.log(rng.gamma(2.0, 1.0, n_genes) + 0.2) - 1.0
    counts = rng.poisson(np.exp(log_base + strength @ loadings)).astype(np.float32)
    adata = sc.AnnData(
        sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {"label": pd.Categorical(["x"] * n_cells)}, index=[f"c{i}" for i in range(n_cells)]
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    adata.layers["counts"] = adata.X.copy()
    return adata


def program_score(loadings: np.ndarray, n_programs: int) -> float:
    centred = loadings - np.median(loadings, axis=0, keepdims=True)
    top = np.argsort(-np.abs(centred), axis=0)[:20]
    overlap = np.array(
        [
            [np.sum(top[:, d] // 20 == k) for d in range(loadings.shape[1])]
            for k in range(n_programs)
        ]
    )
    rows, cols = linear_sum_assignment(-overlap)
    return float(overlap[rows, cols].mean() / 20)


def run_programs(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    k = args.programs
    for seed in args.seeds:
        adata = planted_programs(k, seed)
        scores = {}
        for tool in ("vsc", "vae"):
            model = getattr(sv.tl, tool)(
                adata.copy(),
                likelihood="nb",
                decoder="linear",
                n_latent=k,
                epochs=args.epochs,
                random_state=seed,
                progress=False,
                return_model=True,
            )
            data = adata.copy()
            sv.tl.gene_programs(data, model)
            scores[f"sv.{tool} linear"] = program_score(data.varm[f"{tool}_programs"], k)
        if args.scvi:
            model, _ = scvi_model(adata, args.epochs, k, seed, linear=True)
            scores["LinearSCVI"] = program_score(model.get_loadings().to_numpy(), k)
        for method, score in scores.items():
            rows.append({"seed": seed, "method": method, "recovered": score})
        log(f"programs seed {seed}: {scores}")
    return rows


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def memory_child(shape: list[int]) -> None:
    """In a fresh process: each step's peak RSS on the synthetic CSR, one JSON line."""
    from _common import current_rss
    from bench_training import _process_peak, csr_nbytes, synthetic_csr

    n_cells, n_genes, nnz = shape
    rss = {"imports": current_rss()}
    X = synthetic_csr(n_cells, n_genes, nnz, seed=0)
    # synthetic_csr's values are log-like (log 2..log 21): make them counts 1..20 in place.
    np.expm1(X.data, out=X.data)
    np.rint(X.data, out=X.data)
    groups = np.random.default_rng(0).integers(0, 3, n_cells).astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = sc.AnnData(X, obs=pd.DataFrame({"group": pd.Categorical(groups)}))
    rss["csr"] = current_rss()
    steps: dict[str, Any] = {}

    def step(name: str, fn) -> Any:
        start = time.perf_counter()
        out = fn()
        steps[name] = {"peak": _process_peak(), "s": time.perf_counter() - start}
        return out

    model = step(
        "train (NB VAE, 1 epoch)",
        lambda: sv.tl.vae(
            adata, likelihood="nb", epochs=1, progress=False, return_model=True, device="cpu"
        ),
    )
    genes = list(adata.var_names[:100])
    step(
        "normalized_expression, 100 genes",
        lambda: model.normalized_expression(adata, genes=genes),
    )

    def refused() -> str:
        try:
            sv.tl.normalized_expression(adata, model)
        except ValueError as err:
            return str(err)
        return "written (not refused)"

    message = step("sv.tl.normalized_expression, all genes", refused)
    table = step(
        "differential_expression, group 0 vs rest",
        lambda: model.differential_expression(adata, "group", "0"),
    )
    out = {
        "shape": shape,
        "csr_bytes": csr_nbytes(X),
        "rss": rss,
        "steps": steps,
        "refusal": message.splitlines()[0][:200],
        "de_genes_called": int(table["is_de"].sum()),
    }
    print("BENCH_JSON " + json.dumps(out), flush=True)


def run_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", "--mem-shape"]
    cmd += [str(v) for v in args.mem_shape]
    log(f"memory: {' x '.join(map(str, args.mem_shape))} CSR in a fresh process")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return [{"step": "FAILED", "error": f"exit {proc.returncode}: {tail}"}]
    res = json.loads(lines[-1].removeprefix("BENCH_JSON "))
    bound = res["csr_bytes"] + 1.5 * 2**30
    rows = []
    for name, v in res["steps"].items():
        rows.append(
            {
                "step": name,
                "peak_mb": v["peak"] / 2**20,
                "bound_mb": bound / 2**20,
                "within": v["peak"] < bound,
                "seconds": v["s"],
            }
        )
    rows.append({"step": "refusal", "message": res["refusal"]})
    rows.append({"step": "csr", "csr_mb": res["csr_bytes"] / 2**20, **res["rss"]})
    log(f"memory: {rows}")
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summarise(frame: pd.DataFrame, by: list[str], value: str) -> str:
    table = frame.groupby(by, sort=False)[value].agg(["mean", "min", "max"]).reset_index()
    return markdown_table(
        [*by, f"{value} mean", "min", "max"],
        [
            [*r[: len(by)], f"{r[-3]:.3f}", f"{r[-2]:.3f}", f"{r[-1]:.3f}"]
            for r in table.itertuples(index=False)
        ],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--sets", nargs="+", choices=tuple(DATASETS), default=list(DEFAULT_SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--de-splits", type=int, default=3)
    parser.add_argument("--de-groups", type=int, default=3)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--programs", type=int, default=5)
    parser.add_argument("--no-scvi", dest="scvi", action="store_false")
    parser.add_argument(
        "--mem-shape",
        nargs=3,
        type=int,
        default=[200_000, 20_000, 1_000],
        metavar=("CELLS", "GENES", "NNZ"),
        help="synthetic CSR of the memory part (200000 20000 1000)",
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write every row here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    args = parse_args(argv)
    sc.settings.verbosity = 0
    if args.memory_child:
        memory_child(args.mem_shape)
        return {}
    results: dict[str, list[dict[str, Any]]] = {}
    if "mcv" in args.parts:
        results["mcv"] = [r for name in args.sets for r in run_mcv(name, args)]
    if "de" in args.parts:
        results["de"] = [r for name in args.sets for r in run_de(name, args)]
    if "programs" in args.parts:
        results["programs"] = run_programs(args)
    if "memory" in args.parts:
        results["memory"] = run_memory(args)
    print(
        f"# bench_expression ({git_commit()}, {cpu_model()}, scvae-tools "
        f"{version('scvae-tools')}, scvi-tools {version('scvi-tools')})\n"
    )
    print(f"epochs {args.epochs}, n_latent {args.n_latent}, seeds {args.seeds}\n")
    if "mcv" in results:
        print(
            "## Molecular cross-validation: Poisson loss of the held-out half (lower is better)\n"
        )
        print(summarise(pd.DataFrame(results["mcv"]), ["set", "method"], "poisson_loss"), "\n")
    if "de" in results:
        frame = pd.DataFrame(results["de"])
        calib = frame[frame["part"] == "calibration"]
        print("## DE calibration: genes called between random halves of one population\n")
        print(summarise(calib, ["set", "method"], "genes_called"), "\n")
        agree = frame[frame["part"] == "agreement"]
        print(f"## DE agreement: top-{args.top} overlap with held-out Wilcoxon\n")
        print(summarise(agree, ["set", "method"], "overlap"), "\n")
        print("Genes called DE in those comparisons (each group against the rest):\n")
        print(summarise(agree, ["set", "method"], "genes_called"), "\n")
    if "programs" in results:
        print(f"## Planted programs ({args.programs}): share recovered (Hungarian-matched)\n")
        print(summarise(pd.DataFrame(results["programs"]), ["method"], "recovered"), "\n")
    if "memory" in results:
        rows = results["memory"]
        print(f"## Memory: {' x '.join(map(str, args.mem_shape))} CSR of counts\n")
        steps = [r for r in rows if "peak_mb" in r]
        if steps:
            print(
                markdown_table(
                    ["step", "peak RSS (MB)", "bound: CSR + 1.5 GB (MB)", "within", "s"],
                    [
                        [
                            r["step"],
                            f"{r['peak_mb']:,.0f}",
                            f"{r['bound_mb']:,.0f}",
                            "yes" if r["within"] else "NO",
                            f"{r['seconds']:.1f}",
                        ]
                        for r in steps
                    ],
                )
            )
        for r in rows:
            if "message" in r:
                print(f"\nsv.tl.normalized_expression of all genes: {r['message']}")
            if "error" in r:
                print(f"FAILED: {r['error']}")
        print()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
