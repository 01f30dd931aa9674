#!/usr/bin/env python
"""Out-of-core and data-parallel training: speed, memory and quality, with in-memory baselines.

Usage (from the repository root, under the shared lock, see ``benchmarks/README.md``)::

    python benchmarks/bench_scaling.py            # full run (long: see benchmarks/README.md)
    python benchmarks/bench_scaling.py --quick    # smoke test: a small file, few epochs

Prints markdown tables on stdout (progress goes to stderr):

* Out of core: a synthetic CSR h5ad (full: 1,000,000 x 20,000, 1,000 non-zeros per cell, ~8 GB,
  written chunk by chunk with anndata's backed writers) is trained for one epoch of
  ``sv.tl.vae`` from disk (``backed="r"``); the baseline is one in-memory epoch on its first
  200,000 cells. The two alternate, each in a fresh process, for ``--rounds`` rounds; the table
  gives the training time per cell of each round (range), the whole call and the peak RSS of
  each process (``VmHWM``).
* Quality (PBMC3k after ``sv.pp.recipe_seurat``, the write-up's labels, ``sv.tl.vae`` with
  default hyperparameters, two training seeds): in memory (``scvae-tools train``), backed, and
  two processes (``scvae-tools train --nproc 2``, gloo). Scores: the write-up's protocol
  (t-SNE + k-means NMI/ARI, ``sv.tl.evaluate``) and kNN label purity. The backed runs read a
  copy of the file sorted by label (the hardest case for block shuffling: every block holds one
  cell type) with the block geometry scaled down to PBMC3k's size (blocks of 16 rows, windows of
  32 blocks = 512 cells, as the 1M file has blocks of 512 rows and windows of 32 blocks); with
  the default geometry PBMC3k fits in one window and backed training is identical to in memory.

The synthetic file is kept for reruns (``--data-dir``, default ``/work/bench-data``, outside
git); ``--clean`` deletes it at the end. Helpers come from ``bench_training.py`` (the synthetic
CSR, peak RSS) and ``bench_quality.py`` (PBMC3k with its labels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import _process_peak, current_rss, header, log, synthetic_csr

MB = 2**20
GB = 2**30
TOOL = "vae"
TARGET_RATIO = 1.2
TARGET_RSS = 2 * GB
# PBMC3k's scaled-down block geometry for the backed runs (see the module docstring).
PBMC_BLOCK_ROWS = 16
PBMC_WINDOW_ROWS = 512


# --------------------------------------------------------------------------------------------
# The synthetic file, written chunk by chunk
# --------------------------------------------------------------------------------------------


def write_synthetic(path: Path, n_cells: int, n_genes: int, nnz: int) -> float:
    """Write a synthetic CSR h5ad of ``n_cells`` rows without holding it in memory.

    The first chunk is written by ``anndata.io.write_elem`` (resizable datasets), the others
    appended by ``anndata.io.sparse_dataset(...).append``. Returns the seconds it took.
    """
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    t0 = time.perf_counter()
    partial = path.with_suffix(".partial")
    rows = max(1, (1 << 25) // nnz)  # ~32M non-zeros (256 MB) per chunk
    with h5py.File(partial, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        for i, start in enumerate(range(0, n_cells, rows)):
            chunk = synthetic_csr(min(rows, n_cells - start), n_genes, nnz, seed=i)
            if i == 0:
                write_elem(f, "X", chunk, dataset_kwargs={"chunks": (1 << 18,)})
            else:
                sparse_dataset(f["X"]).append(chunk)
            if i % 5 == 0:
                log(f"  written {start + chunk.shape[0]:,} of {n_cells:,} cells")
        write_elem(f, "obs", pd.DataFrame(index=pd.RangeIndex(n_cells).astype(str)))
        write_elem(f, "var", pd.DataFrame(index=pd.RangeIndex(n_genes).astype(str)))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    partial.rename(path)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Child processes: one epoch, memory measured
# --------------------------------------------------------------------------------------------


def epoch_child(mode: str, path: Path, n_cells: int) -> None:
    """Run in a fresh process: one epoch of sv.tl.vae, in memory or backed; one JSON line."""
    import anndata as ad

    import scvae_tools as sv

    rss_imports = current_rss()
    t0 = time.perf_counter()
    backed = ad.read_h5ad(path, backed="r")
    if mode == "memory":
        X = backed.X[0:n_cells]  # a contiguous slice: read as CSR
        backed.file.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = ad.AnnData(X=X)
    else:
        adata = backed
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss()
    t0 = time.perf_counter()
    sv.tl.vae(adata, epochs=1, progress=False, device="cpu")
    wall = time.perf_counter() - t0
    out = {
        "mode": mode,
        "n_cells": adata.n_obs,
        "load_s": load_s,
        "call_s": wall,
        "train_s": float(adata.uns[TOOL]["training_time_s"]),
        "rss_imports": rss_imports,
        "rss_loaded": rss_loaded,
        "peak": _process_peak(),
    }
    print("BENCH_JSON " + json.dumps(out), flush=True)


def run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    res = json.loads(lines[-1].removeprefix("BENCH_JSON "))
    res["process_s"] = time.perf_counter() - t0
    return res


def outofcore_section(args: argparse.Namespace) -> list[str]:
    n_cells, n_genes, nnz = args.shape
    subset = min(args.memory_cells, n_cells)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    path = args.data_dir / f"synthetic_{n_cells}x{n_genes}x{nnz}.h5ad"
    if path.exists():
        log(f"reusing {path}")
        write_s = None
    else:
        log(f"writing {path} ({n_cells:,} x {n_genes:,}, {nnz:,} non-zeros per cell)")
        write_s = write_synthetic(path, n_cells, n_genes, nnz)
    size = path.stat().st_size
    me = [sys.executable, str(Path(__file__).resolve())]
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        res = {}
        for mode in ("memory", "backed"):
            log(f"round {r + 1}/{args.rounds}: one {mode} epoch")
            res[mode] = run_json(
                [*me, "--child-epoch", mode, str(path), str(subset)], timeout=args.timeout
            )
            if "error" in res[mode]:
                log(f"  FAILED: {res[mode]['error']}")
        rounds.append(res)
    if args.clean:
        path.unlink()

    out = [
        f"### Out of core: one epoch of sv.tl.{TOOL} on a synthetic {n_cells:,} x {n_genes:,} "
        f"CSR h5ad ({nnz:,} non-zeros per cell, {size / GB:.1f} GB on disk), backed, against "
        f"one in-memory epoch on its first {subset:,} cells",
        "",
        "| round | mode | cells | load (s) | training (s) | µs per cell | whole call (s) "
        "| RSS loaded (MB) | peak RSS (MB) | backed / memory per cell |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    ratios, peaks = [], []
    for i, res in enumerate(rounds, 1):
        mem, bk = res.get("memory", {}), res.get("backed", {})
        ratio = None
        if "train_s" in mem and "train_s" in bk:
            ratio = (bk["train_s"] / bk["n_cells"]) / (mem["train_s"] / mem["n_cells"])
            ratios.append(ratio)
        if "peak" in bk:
            peaks.append(bk["peak"])
        for mode, r in (("memory", mem), ("backed", bk)):
            if "error" in r:
                out.append(f"| {i} | {mode} | FAILED: {r['error']} | | | | | | | |")
                continue
            cell = f"{ratio:.2f}x" if mode == "backed" and ratio is not None else ""
            out.append(
                f"| {i} | {mode} | {r['n_cells']:,} | {r['load_s']:.1f} | {r['train_s']:.1f} "
                f"| {1e6 * r['train_s'] / r['n_cells']:.0f} | {r['call_s']:.1f} "
                f"| {r['rss_loaded'] / MB:,.0f} | {r['peak'] / MB:,.0f} | {cell} |"
            )
    out.append("")
    if ratios:
        ok = max(ratios) <= TARGET_RATIO
        out.append(
            f"Backed / in-memory training time per cell: median {statistics.median(ratios):.2f}x, "
            f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds; target "
            f"<= {TARGET_RATIO}x: {'met' if ok else 'NOT met'} (every round)."
        )
    if peaks:
        ok = max(peaks) <= TARGET_RSS
        out.append(
            f"Peak RSS of the backed process: {min(peaks) / MB:,.0f}-{max(peaks) / MB:,.0f} MB; "
            f"target <= {TARGET_RSS / MB:,.0f} MB: {'met' if ok else 'NOT met'}."
        )
    if write_s is not None:
        out.append(f"Writing the file took {write_s:.0f} s (not included above).")
    out += [
        "",
        "Training = the tool's own training-loop time (`uns['vae']['training_time_s']`); "
        "whole call = `sv.tl.vae(adata, epochs=1)` including encoding every cell (a second "
        "pass over the file when backed); load = opening the file (backed) or reading the "
        "subset into memory. Each mode runs in a fresh process; peak RSS is its VmHWM "
        "(imports, data, training and encoding). The file is read through the page cache.",
        "",
    ]
    return out


# --------------------------------------------------------------------------------------------
# PBMC3k: quality of backed and 2-process training against in memory
# --------------------------------------------------------------------------------------------


def backed_child(path: Path, seed: int, epochs: int, out: Path) -> None:
    """Run in a fresh process: sv.tl.vae on ``path`` backed, with the scaled-down geometry."""
    import anndata as ad

    import scvae_tools as sv
    from scvae_tools import _data

    _data.SHUFFLE_BLOCK_ROWS = PBMC_BLOCK_ROWS
    _data.window_rows = lambda values_per_row, batch_size: PBMC_WINDOW_ROWS
    adata = ad.read_h5ad(path, backed="r")
    sv.tl.vae(adata, epochs=epochs, random_state=seed, progress=False, device="cpu")
    rec = adata.uns[TOOL]
    np.save(out, adata.obsm[f"X_{TOOL}"])
    print("BENCH_JSON " + json.dumps({"spe": float(rec["seconds_per_epoch"])}), flush=True)


def pbmc_section(args: argparse.Namespace) -> list[str]:
    import anndata as ad
    from bench_quality import load

    import scvae_tools as sv

    adata, label_key = load("pbmc3k")
    # Sorted by label: every block of rows on disk holds one cell type.
    adata = adata[np.argsort(adata.obs[label_key].to_numpy(), kind="stable")].copy()
    adata.layers.clear()
    configs = ("memory", "backed", "2 processes")
    seeds = list(range(args.seeds))
    timings: dict[str, list[float]] = {c: [] for c in configs}
    walls: dict[str, list[float]] = {c: [] for c in configs}
    me = [sys.executable, str(Path(__file__).resolve())]
    cli = [sys.executable, "-m", "scvae_tools.cli", "train", TOOL]
    with tempfile.TemporaryDirectory(prefix="scvae-scaling-") as tmp:
        path = Path(tmp) / "pbmc3k_sorted.h5ad"
        adata.write_h5ad(path)
        for seed in seeds:
            for config in configs:
                log(f"PBMC3k: {config}, seed {seed}, {args.pbmc_epochs} epochs")
                out = Path(tmp) / f"{config.replace(' ', '_')}_{seed}"
                t0 = time.perf_counter()
                if config == "backed":
                    child = ["--child-backed", str(path), str(seed), str(args.pbmc_epochs)]
                    res = run_json([*me, *child, f"{out}.npy"], timeout=args.timeout)
                    if "error" in res:
                        raise RuntimeError(f"backed run failed: {res['error']}")
                    rep, spe = np.load(str(out) + ".npy"), res["spe"]
                else:
                    nproc = ["--nproc", "2"] if config == "2 processes" else []
                    cmd = [*cli, str(path), "-o", str(out) + ".h5ad", "--quiet", "--device"]
                    cmd += ["cpu", "--epochs", str(args.pbmc_epochs), "--seed", str(seed), *nproc]
                    subprocess.run(cmd, check=True, capture_output=True, timeout=args.timeout)
                    result = ad.read_h5ad(str(out) + ".h5ad")
                    assert (result.obs_names == adata.obs_names).all()
                    rep, spe = result.obsm[f"X_{TOOL}"], result.uns[TOOL]["seconds_per_epoch"]
                walls[config].append(time.perf_counter() - t0)
                timings[config].append(float(spe))
                adata.obsm[rep_key(config, seed)] = rep
    reps = [rep_key(c, s) for c in configs for s in seeds]
    log(f"PBMC3k: sv.tl.evaluate of {len(reps)} latent spaces, {args.eval_seeds} seeds each")
    summary = sv.tl.evaluate(adata, label_key, reps=reps, n_seeds=args.eval_seeds, progress=False)
    means = summary.pivot(index="rep", columns="metric", values="mean")

    out = [
        f"### Quality: sv.tl.{TOOL} on PBMC3k ({adata.n_obs:,} cells x {adata.n_vars:,} genes, "
        f"{args.pbmc_epochs} epochs), {len(seeds)} training seeds per configuration",
        "",
        "| configuration | NMI per seed | ARI per seed | kNN purity per seed | mean NMI / ARI / "
        "purity | training s/epoch | whole run (s) | within the seed spread of memory |",
        "|---|---|---|---|---|--:|--:|---|",
    ]
    metrics = ("nmi", "ari", "knn_purity")
    values = {
        c: {m: [float(means.loc[rep_key(c, s), m]) for s in seeds] for m in metrics}
        for c in configs
    }
    for c in configs:
        v = values[c]
        checks = []
        for m in metrics:
            ref, own = values["memory"][m], v[m]
            spread = max(max(ref) - min(ref), max(own) - min(own))
            checks.append(abs(np.mean(own) - np.mean(ref)) <= spread)
        cells = [" / ".join(f"{x:.3f}" for x in v[m]) for m in metrics]
        mean_cell = " / ".join(f"{np.mean(v[m]):.3f}" for m in metrics)
        within = "-" if c == "memory" else ("yes" if all(checks) else "NO")
        if c != "memory" and len(seeds) < 2:
            within = "n/a (one seed)"
        out.append(
            f"| {c} | {cells[0]} | {cells[1]} | {cells[2]} | {mean_cell} "
            f"| {_range(timings[c], 3)} | {_range(walls[c], 1)} | {within} |"
        )
    out += [
        "",
        "NMI/ARI: the write-up's protocol (t-SNE perplexity 40, k-means k = 9, n_init = 100), "
        f"mean over {args.eval_seeds} protocol seeds per latent space; kNN purity: share of each "
        "cell's 15 nearest neighbours in the latent space with its label. 'Within the seed "
        "spread': for each of the three scores, |mean - mean in memory| <= the larger of the two "
        "configurations' ranges over training seeds. 'training s/epoch': the tool's own loop "
        "time per epoch (rank 0's for 2 processes), range over seeds; 'whole run': the command "
        "(process start, imports, reading the file, training, encoding, writing), range. "
        f"Backed runs read the label-sorted file with blocks of {PBMC_BLOCK_ROWS} rows and windows "
        f"of {PBMC_WINDOW_ROWS} cells; '2 processes' is `scvae-tools train --nproc 2` (gloo), "
        "each process with one thread of this machine's cores, batch 256 split 128 + 128.",
        "",
    ]
    return out


def rep_key(config: str, seed: int) -> str:
    return f"X_{config.replace(' ', '_')}_s{seed}"


def _range(xs: list[float], digits: int) -> str:
    if not xs:
        return "n/a"
    lo, hi = min(xs), max(xs)
    return f"{lo:.{digits}f}" if lo == hi else f"{lo:.{digits}f}-{hi:.{digits}f}"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small file, few epochs, one seed")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("CELLS", "GENES", "NNZ"),
        help="synthetic file (default 1000000 20000 1000; quick 100000 5000 500)",
    )
    p.add_argument(
        "--memory-cells",
        type=int,
        help="cells of the in-memory baseline (default 200000; quick 30000)",
    )
    p.add_argument("--rounds", type=int, help="alternating rounds (default 2; quick 1)")
    p.add_argument("--seeds", type=int, help="training seeds on PBMC3k (default 2; quick 1)")
    p.add_argument("--pbmc-epochs", type=int, help="epochs on PBMC3k (default 200; quick 5)")
    p.add_argument("--eval-seeds", type=int, help="protocol seeds per latent space (default 1)")
    p.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    p.add_argument("--clean", action="store_true", help="delete the synthetic file at the end")
    p.add_argument("--no-outofcore", action="store_true", help="skip the synthetic file")
    p.add_argument("--no-pbmc", action="store_true", help="skip the PBMC3k quality section")
    p.add_argument("--timeout", type=float, default=1200, help="per child process (s)")
    p.add_argument("--output", type=Path, help="also write the markdown report here")
    p.add_argument("--child-epoch", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--child-backed", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child_epoch:
        mode, path, n = args.child_epoch
        epoch_child(mode, Path(path), int(n))
        return
    if args.child_backed:
        path, seed, epochs, out = args.child_backed
        backed_child(Path(path), int(seed), int(epochs), Path(out))
        return
    quick = args.quick
    args.shape = args.shape or ((100_000, 5_000, 500) if quick else (1_000_000, 20_000, 1000))
    args.memory_cells = args.memory_cells or (30_000 if quick else 200_000)
    args.rounds = args.rounds or (1 if quick else 2)
    args.seeds = args.seeds or (1 if quick else 2)
    args.pbmc_epochs = args.pbmc_epochs or (5 if quick else 200)
    args.eval_seeds = args.eval_seeds or 1
    # header() reports these bench_training options; say what they mean here.
    args.repeats, args.epochs = args.rounds, 1

    t_start = time.perf_counter()
    lines = [
        *header(args)[:5],
        f"- {args.rounds} alternating rounds (in memory, backed), each a fresh process; "
        f"PBMC3k: {args.seeds} training seeds x {args.pbmc_epochs} epochs",
        "",
    ]
    lines[0] = lines[0].replace("training benchmark", "scaling benchmark")
    print("\n".join(lines), flush=True)
    # Each section is printed as soon as it is done, so a later failure keeps the earlier ones.
    sections = [] if args.no_outofcore else [outofcore_section]
    sections += [] if args.no_pbmc else [pbmc_section]
    for section in sections:
        part = section(args)
        print("\n".join(part), flush=True)
        lines += part
    lines.append(f"Total benchmark time: {time.perf_counter() - t_start:.0f} s.")
    print(lines[-1])
    report = "\n".join(lines)
    if args.output:
        args.output.write_text(report + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    main()
