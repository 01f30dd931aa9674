#!/usr/bin/env python
"""Integration across batches: our batch-aware models against PCA, Harmony and scVI, by scIB.

Two multi-batch sets from ../shared/data, each under its own 2,000 HVGs (``seurat_v3`` on the
counts, per batch):

* CellBench RNA mixtures: the same 7 mixtures of three cell lines sequenced by CEL-seq2 and by
  SORT-seq (636 pseudo-cells); label = mixture, batch = protocol.
* PBMC3k in two batches with a known batch effect: the 2,638 cells of the Seurat recipe, half
  of them (at random) turned into batch "B" by per-gene log-normal factors on the counts
  (``exp(N(0, sd^2))``, sd 0.5 by default), applied by binomial thinning (factor < 1) plus
  Poisson extra counts (factor > 1); labels = the write-up's 9 Seurat clusters.

Methods, all on the same HVGs: PCA (50 components of the log-normalised data, uncorrected; and
evaluate's reference rows, the PCA with as many components as our latents and with 10),
Harmony on that 50-component PCA (harmonypy), scVI (scvi-tools' SCVI, ZINB and NB, same
batch_key, same epochs and latent size as ours, its other defaults), and ours: sv.tl.ae, vae
and vsc, Gaussian on the log-normalised data and NB and ZINB on the counts, all with
``batch_key``. Everything is scored by ``sv.tl.evaluate(..., batch_key=..., protocol=False)``,
that is by scib-metrics (unscaled scores; total = 0.6 bio + 0.4 batch).

Then the count path's speed: whole calls of sv.tl.<tool>(layer="counts", likelihood=...,
batch_key="batch") against SCVI with the same likelihood, data, batch size (256) and batch key,
on the two-batch PBMC3k with all 13,714 genes and with the 2,000 HVGs, in alternating rounds.

    python benchmarks/bench_integration.py                   # both parts (~30-40 min, 2 cores)
    python benchmarks/bench_integration.py --no-timing       # the scores only
    python benchmarks/bench_integration.py --timing-only
    python benchmarks/bench_integration.py --figures docs/_static --output integration.md
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scanpy as sc
from _common import (
    cpu_model,
    git_commit,
    loadavg,
    log,
    markdown_table,
    scvi_latent,
    time_scvi,
    value_range,
    version,
)
from _datasets import N_HVG, cellbench_counts, from_counts, pbmc3k_two_batches_counts

import scvae_tools as sv
from scvae_tools._schedule import training_schedule
from scvae_tools.tl._integration import AGGREGATES, BATCH_METRICS, BIO_METRICS

TOOLS = ("ae", "vae", "vsc")
LIKELIHOODS = ("gaussian", "nb", "zinb")
N_PCS = 50
TIMING_BATCH_SIZE = 256
TARGET_SPEEDUP = 5.0


def _default(name: str) -> Any:
    """Our tools' default for a parameter, so that the baselines follow it when it changes."""
    return inspect.signature(sv.tl.vae).parameters[name].default


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def harmony(adata: sc.AnnData) -> np.ndarray:
    try:
        import harmonypy
    except ImportError:
        sys.exit("Harmony needs harmonypy: pip install -e '.[bench]'")
    result = harmonypy.run_harmony(
        adata.obsm[f"X_pca{N_PCS}"], adata.obs, "batch", random_state=0, verbose=False
    )
    z = np.asarray(result.Z_corr)
    return z if z.shape[0] == adata.n_obs else z.T


def integrate(adata: sc.AnnData, epochs: int | str, n_latent: int) -> dict[str, float]:
    """Every method's embedding into ``adata.obsm``; returns each one's wall time (s).

    ``epochs`` is ours (an int, or ``"auto"``: our rule for this many cells); scVI trains for
    the number of epochs that ours ran.
    """
    seconds: dict[str, float] = {}
    batch_size = _default("batch_size")
    scvi_epochs = training_schedule(adata.n_obs, epochs, batch_size).epochs

    def timed(key: str, fn: Any) -> None:
        t0 = time.perf_counter()
        out = fn()
        seconds[key] = time.perf_counter() - t0
        if out is not None:
            adata.obsm[key] = np.asarray(out, dtype=np.float32)

    timed(f"X_pca{N_PCS}", lambda: sc.pp.pca(adata.X, n_comps=N_PCS, random_state=0))
    timed("X_harmony", lambda: harmony(adata))
    for lik in ("zinb", "nb"):
        key = "X_scvi" if lik == "zinb" else f"X_scvi_{lik}"
        log(f"  SCVI {lik}, {scvi_epochs} epochs")
        timed(
            key,
            lambda lik=lik: scvi_latent(
                adata,
                epochs=scvi_epochs,
                n_latent=n_latent,
                n_top_genes=None,
                batch_key="batch",
                likelihood=lik,
            ),
        )
    for lik in LIKELIHOODS:
        layer = None if lik == "gaussian" else "counts"
        for tool in TOOLS:
            key = f"X_{tool}_{lik}"
            log(f"  sv.tl.{tool}, {lik}, batch_key, epochs={epochs} ({scvi_epochs})")
            timed(
                key,
                lambda tool=tool, layer=layer, lik=lik, key=key: getattr(sv.tl, tool)(
                    adata,
                    layer=layer,
                    likelihood=lik,
                    batch_key="batch",
                    epochs=epochs,
                    key_added=key,
                    progress=False,
                ),
            )
    return seconds


def _method_name(rep: str) -> str:
    names = {
        f"X_pca{N_PCS}": f"PCA ({N_PCS}), uncorrected",
        "X_harmony": f"Harmony (on PCA {N_PCS})",
        "X_scvi": "scVI (ZINB)",
        "X_scvi_nb": "scVI (NB)",
    }
    if rep in names:
        return names[rep]
    if rep.startswith("pca"):
        return f"PCA ({rep[3:]}), evaluate's reference"
    tool, lik = rep[2:].split("_")
    return f"sv.tl.{tool}, {lik}"


def score_set(name: str, adata: sc.AnnData, args: argparse.Namespace) -> pd.DataFrame:
    log(
        f"{name}: {adata.n_obs} cells x {adata.n_vars} HVGs, "
        f"{adata.obs['label'].nunique()} labels, batches "
        + ", ".join(f"{b} {n}" for b, n in adata.obs["batch"].value_counts().sort_index().items())
    )
    seconds = integrate(adata, args.epochs, args.n_latent)
    reps = [k for k in seconds if k in adata.obsm]
    log(f"{name}: scIB metrics of {len(reps)} embeddings and the PCA references")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sv.tl.evaluate(adata, "label", reps=reps, batch_key="batch", protocol=False, progress=False)
    table = adata.uns["evaluate"]["scib"].copy()
    table["seconds"] = pd.Series(seconds)
    return table


def scores_markdown(name: str, table: pd.DataFrame) -> list[str]:
    cols = [*BIO_METRICS, *BATCH_METRICS, *AGGREGATES]
    rows = []
    for rep in table.sort_values("total", ascending=False).index:
        r = table.loc[rep]
        seconds = f"{r['seconds']:.1f}" if np.isfinite(r["seconds"]) else ""
        rows.append(
            [_method_name(rep)]
            + [f"{r[c]:.3f}" if np.isfinite(r[c]) else "n/a" for c in cols]
            + [seconds]
        )
    header = ["method", *cols, "time (s)"]
    return [f"### {name}", "", markdown_table(header, rows), ""]


def targets(name: str, table: pd.DataFrame) -> list[str]:
    scvi = table.loc[[r for r in table.index if r.startswith("X_scvi")], "total"]
    best_scvi = scvi.max()
    harmony_total = table.loc["X_harmony", "total"]
    ours = table.loc[[r for r in table.index if r[2:].split("_")[0] in TOOLS], "total"]
    lines = [f"Targets on {name} (scIB total):", ""]
    for rep, total in ours.items():
        if rep.startswith(("X_vae", "X_vsc")):
            ok = total >= best_scvi
            lines.append(
                f"- {_method_name(rep)}: {total:.3f} vs the better scVI {best_scvi:.3f}: "
                + ("yes" if ok else "NO")
            )
    best = ours.idxmax()
    lines.append(
        f"- best of ours ({_method_name(best)}) {ours.max():.3f} vs Harmony "
        f"{harmony_total:.3f}: " + ("yes" if ours.max() >= harmony_total else "NO")
    )
    return [*lines, ""]


# --------------------------------------------------------------------------------------------
# Speed of the count path against SCVI
# --------------------------------------------------------------------------------------------


def time_ours(adata: sc.AnnData, tool: str, likelihood: str, epochs: int) -> float:
    """Seconds per training epoch of one call: its training time / epochs (set-up excluded).

    That is the mean over all its epochs, the first included, where SCVI's figure is the median
    epoch after a warm-up epoch: if anything, the comparison favours SCVI.
    """
    key = "_bench_timing"
    getattr(sv.tl, tool)(
        adata,
        layer="counts",
        likelihood=likelihood,
        batch_key="batch",
        epochs=epochs,
        batch_size=TIMING_BATCH_SIZE,
        key_added=key,
        progress=False,
    )
    per_epoch = float(adata.uns[key]["seconds_per_epoch"])
    for k in (key, f"{key}_spike"):
        adata.obsm.pop(k, None)
    adata.uns.pop(key, None)
    return per_epoch


def timing_section(counts: sc.AnnData, args: argparse.Namespace) -> list[str]:
    full = counts.copy()
    full.layers["counts"] = full.X
    sets = {f"all {full.n_vars:,} genes": full, f"{N_HVG:,} HVGs": from_counts(counts)}
    out = [
        f"### Speed of the count path: PBMC3k in two batches, {full.n_obs:,} cells, batch size "
        f"{TIMING_BATCH_SIZE}, batch_key, {args.rounds} alternating rounds of "
        f"{args.timing_epochs} epochs",
        "",
    ]
    rows = []
    for gs, data in sets.items():
        for lik in args.timing_likelihoods:
            log(f"timing {gs}, {lik}: warm-up")
            for tool in TOOLS:
                time_ours(data, tool, lik, 1)
            ours: dict[str, list[float]] = {t: [] for t in TOOLS}
            scvi: list[float] = []
            ratios: dict[str, list[float]] = {t: [] for t in TOOLS}
            for r in range(args.rounds):
                log(f"timing {gs}, {lik}: round {r + 1}/{args.rounds}")
                this = {t: time_ours(data, t, lik, args.timing_epochs) for t in TOOLS}
                theirs = time_scvi(
                    data,
                    lik,
                    epochs=args.timing_epochs,
                    n_latent=args.n_latent,
                    batch_size=TIMING_BATCH_SIZE,
                    batch_key="batch",
                ).per_epoch
                scvi.append(theirs)
                for t in TOOLS:
                    ours[t].append(this[t])
                    ratios[t].append(theirs / this[t])
            for t in TOOLS:
                low = min(ratios[t])
                rows.append(
                    [
                        gs,
                        lik,
                        f"sv.tl.{t}",
                        value_range(ours[t]),
                        value_range(scvi),
                        value_range(ratios[t]) + "x",
                        "ok" if statistics.median(ratios[t]) >= TARGET_SPEEDUP else "MISS",
                        "ok" if low >= TARGET_SPEEDUP else "MISS",
                    ]
                )
    header = [
        "genes",
        "likelihood",
        "ours",
        "ours s/epoch",
        "SCVI s/epoch",
        "SCVI / ours",
        f">= {TARGET_SPEEDUP:g}x (median)",
        f">= {TARGET_SPEEDUP:g}x (every round)",
    ]
    out += [markdown_table(header, rows, "lllrrrll"), ""]
    out += [
        "Cells: median over rounds (min-max). Ours: a call's training time / its epochs (the "
        "mean epoch, the first included; input checks, set-up and encoding excluded), after an "
        "untimed 1-epoch call; SCVI: its median epoch after a warm-up epoch, timed by a Lightning "
        "callback (set-up excluded). Within a round, ours and SCVI run back to back, so both see "
        "the same load.",
        "",
    ]
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def header(args: argparse.Namespace) -> list[str]:
    import torch

    return [
        f"## scvae-tools integration benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- CPU: {cpu_model()}; torch threads {torch.get_num_threads()}; load average at "
        f"start {loadavg()}",
        f"- scvae-tools {version('scvae-tools')} (git {git_commit()}), scvi-tools "
        f"{version('scvi-tools')}, harmonypy {version('harmonypy')}, scib-metrics "
        f"{version('scib-metrics')}, scanpy {version('scanpy')}, torch {torch.__version__}",
        f"- epochs={args.epochs!r} for ours (our default; 'auto' is at least 2,200 optimizer "
        "steps: 734 epochs of 256 on CellBench's 636 cells, 200 on PBMC3k) and as many epochs "
        f"for scVI; {args.n_latent} latent dimensions for both (our default); the other "
        "settings are each tool's defaults (scVI: batch 128, n_hidden 128). PBMC3k batch "
        f"effect: per-gene log-normal factors, sd {args.shift_sd:g}, on half the cells.",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["cellbench", "pbmc3k"])
    parser.add_argument(
        "--epochs",
        type=lambda v: v if v == "auto" else int(v),
        default=_default("epochs"),
        help="ours (default: our default); scVI trains as many epochs as ours ran",
    )
    parser.add_argument("--n-latent", type=int, default=_default("n_latent"))
    parser.add_argument("--shift-sd", type=float, default=0.5)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--timing-epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timing-likelihoods", nargs="+", default=["nb", "zinb"])
    parser.add_argument(
        "--figures", metavar="DIR", help="save each set's scIB table as a figure and a CSV"
    )
    parser.add_argument("--output", metavar="FILE", help="also write the report to FILE")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    lines = header(args)
    report: list[str] = []
    pbmc = None
    if not args.timing_only:
        for name in args.sets:
            if name == "cellbench":
                title, data = "CellBench RNA mixtures, CEL-seq2 + SORT-seq", cellbench_counts()
            elif name == "pbmc3k":
                pbmc = pbmc3k_two_batches_counts(args.shift_sd)
                title, data = "PBMC3k in two batches (known effect)", pbmc
            else:
                sys.exit(f"unknown set {name!r}: cellbench or pbmc3k")
            adata = from_counts(data)
            table = score_set(name, adata, args)
            title = (
                f"{title}: {adata.n_obs} cells, {adata.n_vars} HVGs, "
                f"{adata.obs['label'].nunique()} labels"
            )
            lines += scores_markdown(title, table) + targets(name, table)
            if args.figures:
                import matplotlib

                matplotlib.use("Agg")
                out = Path(args.figures)
                out.mkdir(parents=True, exist_ok=True)
                shown = table.drop(columns="seconds").rename(index=_method_name)
                ax = sv.pl.integration_scores(shown, show=False)
                figure = out / f"integration_{name}.png"
                ax.figure.savefig(figure, dpi=80, bbox_inches="tight")
                table.to_csv(out / f"integration_{name}.csv")
                # The report links its figures, relative to where it is written.
                base = Path(args.output).resolve().parent if args.output else Path.cwd()
                link = os.path.relpath(figure.resolve(), base)
                lines += [f"![scIB metrics, {title}]({link})", ""]
            print("\n".join(lines), flush=True)  # each set as soon as it is done
            report += lines
            lines = []
            if args.output:
                Path(args.output).write_text("\n".join(report))
    if not args.no_timing:
        if pbmc is None:
            pbmc = pbmc3k_two_batches_counts(args.shift_sd)
        lines += timing_section(pbmc, args)
        print("\n".join(lines), flush=True)
        report += lines
    if args.output:
        Path(args.output).write_text("\n".join(report))


if __name__ == "__main__":
    main()
