#!/usr/bin/env python
"""What one option of ``sv.tl.ae`` / ``vae`` / ``vsc`` costs in training time, against the default.

Usage (from the repository root, see ``benchmarks/README.md``)::

    python benchmarks/bench_option.py --set linear_path=false        # A: that, B: the default
    python benchmarks/bench_option.py --set linear_path=true --epochs 40 --rounds 6

On PBMC3k after the Seurat recipe (CSR), with all genes and with 2,000 HVGs, each tool runs in
alternating rounds with the ``--set`` options (A) and with its defaults (B), after one untimed
1-epoch warm-up call of each, so that the shared machine's drift hits both sides. Prints a
markdown table of the median (range) over rounds of the training loop's seconds per epoch (the
tool's own ``training_time_s``), of the ratio B / A within each round, and of the whole call's
wall time (input checks, set-up, training and encoding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import PBMC3K_DIR, cpu_model, git_commit, hvg_subset, load_pbmc3k, loadavg, log


def _range(values: list[float], digits: int = 3) -> str:
    mid, low, high = statistics.median(values), min(values), max(values)
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def compare(adata, tool: str, options: dict, epochs: int, rounds: int) -> dict[str, list[float]]:
    """Alternating rounds of ``sv.tl.<tool>`` with ``options`` (A) and with its defaults (B)."""
    import scvae_tools as sv

    fit = getattr(sv.tl, tool)
    arms = {"A": options, "B": {}}
    for arm in arms.values():
        fit(adata, epochs=1, progress=False, key_added="_bench", **arm)
    out: dict[str, list[float]] = {f"{k}_{a}": [] for k in ("loop", "wall") for a in arms}
    for r in range(rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            t0 = time.perf_counter()
            fit(
                adata,
                epochs=epochs,
                progress=False,
                key_added="_bench",
                random_state=r,
                **arms[name],
            )
            out[f"wall_{name}"].append(time.perf_counter() - t0)
            out[f"loop_{name}"].append(adata.uns["_bench"]["training_time_s"] / epochs)
    adata.obsm.pop("_bench", None)
    adata.obsm.pop("_bench_spike", None)
    adata.uns.pop("_bench", None)
    out["ratio"] = [b / a for a, b in zip(out["loop_A"], out["loop_B"], strict=True)]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="arm A's options (JSON values); arm B is the tools' defaults",
    )
    p.add_argument("--tools", nargs="+", default=["ae", "vae", "vsc"])
    p.add_argument("--epochs", type=int, default=20, help="epochs per timed call (20)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (4)")
    p.add_argument("--data-dir", type=Path, default=PBMC3K_DIR, help="pbmc3k folder")
    args = p.parse_args(argv)
    options = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if not options:
        p.error("give arm A's options with --set NAME=VALUE")

    adata, how = load_pbmc3k(args.data_dir)
    sets = {f"all {adata.n_vars:,} genes": adata, "2,000 HVGs": hvg_subset(adata.copy())}
    a_name = ", ".join(f"{k}={v!r}" for k, v in options.items())
    lines = [
        f"## Cost of {a_name} (A) against the defaults (B)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, commit {git_commit()}, {cpu_model()}, load "
        f"{loadavg()}; PBMC3k ({adata.n_obs:,} cells, {how}), CSR; {args.epochs} epochs per "
        f"call, {args.rounds} alternating rounds, median (range) over rounds.",
        "",
        "| data | tool | A: s/epoch | B: s/epoch | B / A | A: whole call, s | B: whole call, s |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for name, data in sets.items():
        for tool in args.tools:
            log(f"{name}: sv.tl.{tool}")
            r = compare(data, tool, options, args.epochs, args.rounds)
            lines.append(
                f"| {name} | {tool} | {_range(r['loop_A'])} | {_range(r['loop_B'])} | "
                f"{_range(r['ratio'])} | {_range(r['wall_A'], 2)} | {_range(r['wall_B'], 2)} |"
            )
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
