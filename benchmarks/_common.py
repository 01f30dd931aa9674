"""What the benchmarks share: PBMC3k and its Seurat recipe, SCVI, RSS, timing and tables.

Imported by ``bench_training.py``, ``bench_quality.py`` and ``bench_integration.py`` (run as
scripts from the repository root, so this folder is on ``sys.path``).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PBMC3K_DIR = SHARED_DATA / "pbmc3k"
MB = 2**20


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process, bytes."""
    kb = status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return status_kb("VmHWM") is not None


class PeakRSS:
    """Peak RSS of this process while a ``with`` block runs.

    Exact on Linux (the high-water mark ``VmHWM`` is reset on entry and read on exit); elsewhere
    ``psutil`` samples the RSS every 2 ms, which can miss short spikes.
    """

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.before = current_rss()
        self._exact = reset_peak()
        self._stop = threading.Event()
        self._max = self.before
        if not self._exact:
            import psutil

            proc = psutil.Process()

            def sample() -> None:
                while not self._stop.wait(0.002):
                    self._max = max(self._max, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._exact:
            self.peak = (status_kb("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, current_rss())

    @property
    def delta(self) -> int:
        return self.peak - self.before


def inline_recipe(adata: Any) -> Any:
    import scanpy as sc

    sc.pp.filter_genes(adata, min_cells=3)
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    keep = (
        (adata.obs["n_genes_by_counts"] > 200)
        & (adata.obs["n_genes_by_counts"] < 2500)
        & (adata.obs["pct_counts_mt"] < 5)
    )
    adata = adata[keep.to_numpy()].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def load_pbmc3k(data_dir: Path) -> tuple[Any, str]:
    """PBMC3k after the Seurat recipe: log-normalised ``X`` (CSR) and a ``counts`` layer."""
    import anndata as ad

    path = data_dir / "pbmc3k_raw.h5ad"
    if not path.exists():
        sys.exit(f"PBMC3k not found at {path}; pass --data-dir (the folder of pbmc3k_raw.h5ad).")
    raw = ad.read_h5ad(path)
    raw.var_names_make_unique()
    raw.X = sp.csr_matrix(raw.X, dtype=np.float32)

    how = "inline Seurat recipe (filter_genes min_cells=3, QC, normalize_total 1e4, log1p)"
    adata = None
    try:
        from scvae_tools.pp import recipe_seurat  # may appear in a later version
    except ImportError:
        recipe_seurat = None
    if recipe_seurat is not None:
        try:
            copy = raw.copy()
            out = recipe_seurat(copy)
            candidate = out if out is not None else copy
            if candidate.shape == (2638, 13714) and float(candidate.X.max()) < 20:
                adata, how = candidate, "scvae_tools.pp.recipe_seurat"
            else:
                log(f"recipe_seurat gave {candidate.shape}, not log data of 2638 x 13714; inlined")
        except Exception as err:  # fall back to the documented recipe
            log(f"recipe_seurat failed ({err!r}); using the inline recipe")
    if adata is None:
        adata = inline_recipe(raw.copy())
    if not sp.issparse(adata.X) or adata.X.format != "csr":
        adata.X = sp.csr_matrix(adata.X)
    adata.X = adata.X.astype(np.float32)
    # Raw counts of the same cells and genes, for the HVG selection and for scvi-tools.
    adata.layers["counts"] = sp.csr_matrix(raw[adata.obs_names, adata.var_names].X)
    return adata, how


def hvg_subset(adata: Any, n_top: int = 2000) -> Any:
    import scanpy as sc

    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top, layer="counts")
    return adata[:, adata.var["highly_variable"].to_numpy()].copy()


@dataclass
class Timing:
    name: str
    per_epoch: float  # seconds per epoch used for ratios
    est_200: float  # predicted wall time of a 200-epoch run
    peak: int = 0
    delta: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def fmt_s(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_mb(x: int) -> str:
    return f"{round(x / MB):,d}"


def quiet_scvi() -> Any:
    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"(lightning|pytorch_lightning|scvi)(\..*)?")
    import scvi

    scvi.settings.verbosity = logging.WARNING
    scvi.settings.seed = 0
    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return scvi


def time_scvi(
    adata: Any,
    likelihood: str,
    *,
    epochs: int,
    n_latent: int = 6,
    batch_size: int = 256,
    batch_key: str | None = None,
    extrapolate_epochs: int = 200,
) -> Timing:
    """``SCVI(n_latent=6, gene_likelihood=...)`` on the raw counts layer, all cells.

    ``per_epoch`` is the median of ``epochs`` epochs timed by a Lightning callback, after 1
    warm-up epoch; the 200-epoch estimate adds ``setup_anndata`` + model + trainer set-up once.
    With ``batch_key``, SCVI is conditioned on that column of ``adata.obs``. ``extra`` holds
    the set-up time (``"setup"``) and every timed epoch (``"epochs"``).
    """
    import anndata as ad
    import torch
    from lightning.pytorch.callbacks import Callback

    threads = torch.get_num_threads()
    scvi = quiet_scvi()

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.times.append(time.perf_counter() - self._t0)

    timer = EpochTimer()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        counts = ad.AnnData(X=adata.layers["counts"].copy())
        counts.obs_names, counts.var_names = adata.obs_names, adata.var_names
        if batch_key is not None:
            counts.obs[batch_key] = adata.obs[batch_key].to_numpy()
        scvi.model.SCVI.setup_anndata(counts, batch_key=batch_key)
        model = scvi.model.SCVI(counts, n_latent=n_latent, gene_likelihood=likelihood)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(
                max_epochs=1 + epochs,
                train_size=1.0,
                batch_size=batch_size,
                early_stopping=False,
                enable_progress_bar=False,
                accelerator="cpu",
                devices=1,
                callbacks=[timer],
                enable_model_summary=False,
                logger=False,
                enable_checkpointing=False,
            )
        wall = time.perf_counter() - t0
    torch.set_num_threads(threads)  # in case Lightning changed it
    del model, counts
    per_epoch = statistics.median(timer.times[1:])
    fixed = wall - sum(timer.times)
    return Timing(
        f"SCVI {likelihood}",
        per_epoch,
        fixed + extrapolate_epochs * per_epoch,
        mem.peak,
        mem.delta,
        {"setup": fixed, "epochs": timer.times[1:]},
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        res = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return res.stdout.strip() + (" (src/ modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def seed_clusters(adata: Any, data_dir: Path = PBMC3K_DIR) -> Any:
    """The write-up's 9 Seurat clusters of the QC-passing PBMC3k cells, as a categorical."""
    import pandas as pd

    seed = pd.read_csv(data_dir / "pbmc3k_seed_clusters.csv", index_col="barcode")
    return pd.Categorical(seed["seed_cluster"].reindex(adata.obs_names).astype(str))


def scvi_latent(
    adata: Any,
    *,
    epochs: int,
    n_latent: int = 6,
    n_top_genes: int | None = 2000,
    batch_key: str | None = None,
    likelihood: str = "zinb",
    batch_size: int = 128,
    seed: int = 0,
) -> np.ndarray:
    """scvi-tools' SCVI latent space of ``adata.layers["counts"]``, all cells, no early stop.

    With ``n_top_genes``, first the ``seurat_v3`` HVGs of the counts (per batch with
    ``batch_key``); None trains on the genes as given. ``batch_size`` 128 is SCVI's default.
    ``seed`` is scvi-tools' global seed (``scvi.settings.seed``), set before the model is built.
    """
    import scanpy as sc

    try:
        scvi = quiet_scvi()
    except ImportError:
        sys.exit("SCVI needs scvi-tools: pip install -e '.[bench]'")
    if "counts" not in adata.layers:
        sys.exit("SCVI needs raw counts in adata.layers['counts'] (PBMC3k has them).")
    scvi.settings.seed = seed
    hv = adata.copy()
    if n_top_genes is not None:
        sc.pp.highly_variable_genes(
            hv, flavor="seurat_v3", n_top_genes=n_top_genes, layer="counts", batch_key=batch_key
        )
        hv = hv[:, hv.var["highly_variable"]].copy()
    scvi.model.SCVI.setup_anndata(hv, layer="counts", batch_key=batch_key)
    model = scvi.model.SCVI(hv, n_latent=n_latent, gene_likelihood=likelihood)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(
            max_epochs=epochs,
            batch_size=batch_size,
            train_size=1.0,
            early_stopping=False,
            enable_progress_bar=False,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
        )
    return model.get_latent_representation()


def value_range(values: list[float]) -> str:
    """``"median (min-max)"`` of a few measurements."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def markdown_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column, ``l`` or ``r`` (default r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
