"""The ``scvae-tools`` command line.

``scvae-tools train ... --nproc N`` trains data-parallel on this machine: it starts N processes
with torch's elastic launcher (what ``torchrun`` runs), each of which runs this same command as a
worker. Under ``torchrun``, on one machine or several, the command sees the launcher's
``WORLD_SIZE``/``RANK`` variables and runs as one of its workers. See the Scaling page of the
documentation.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

_MODELS = ("ae", "vae", "vsc")


class WorkerFailedError(RuntimeError):
    """A process of a ``--nproc`` launch failed; the message is its error."""


def _int_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--epochs",
        type=_int_or_auto,
        default="auto",
        help="passes over all cells, or 'auto': at least 2,200 steps (4,400 for the AE), else "
        "min(200, 8e6 / cells) (auto)",
    )
    parser.add_argument("--n-latent", type=int, default=6, help="latent dimensions (6)")
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=[128, 32, 16], help="encoder widths (128 32 16)"
    )
    parser.add_argument(
        "--first-activation",
        action=argparse.BooleanOptionalAction,
        default="auto",
        help="a ReLU after the encoder's first layer, or none (the write-up's); "
        "default: only with a count likelihood",
    )
    parser.add_argument(
        "--decoder",
        choices=("linear", "shallow", "mlp"),
        default=None,
        help="linear: code (and batch) to genes in one layer, as LDVAE; shallow: one hidden "
        "layer, as scVI; mlp: the encoder's widths mirrored, the write-up's (default: linear, "
        "shallow with --batch-key)",
    )
    parser.add_argument(
        "--activation",
        choices=("relu", "leaky_relu"),
        default=None,
        help="the hidden layers' activation (default: leaky_relu for the AE, relu for the VAE "
        "and VSC)",
    )
    parser.add_argument(
        "--linear-path",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a linear path from the input to the code, started at the principal axes "
        "(default: for the AE and the VAE, Gaussian, without --batch-key)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="cells per minibatch (256)")
    parser.add_argument(
        "--early-stopping",
        action="store_true",
        help="hold 10%% of the cells out and stop when their loss stops improving (off)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="random_state (0)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16: the output layer's products in bfloat16, faster on CPUs with "
        "AVX512-BF16 or AMX (float32)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scvae-tools",
        description="Deep AE, beta-VAE and beta-VSC latent spaces of single-cell data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train one model on an .h5ad file and write the latent space into a copy",
        description=(
            "Train one model and write obsm['X_<model>'] and uns['<model>'] into OUT. With no "
            "input file, trains on scanpy's bundled pbmc68k_reduced."
        ),
    )
    train.add_argument("model", choices=_MODELS)
    train.add_argument("input", nargs="?", help=".h5ad file (default: pbmc68k_reduced)")
    train.add_argument("-o", "--output", required=True, help="output .h5ad file")
    train.add_argument("--layer", default=None, help="train on this layer instead of X")
    train.add_argument(
        "--likelihood",
        choices=("gaussian", "nb", "zinb", "poisson"),
        default="gaussian",
        help="gaussian: squared error on log-normalised data; nb, zinb, poisson: raw counts, "
        "e.g. with --layer counts (gaussian)",
    )
    train.add_argument(
        "--batch-key",
        default=None,
        help="obs column with each cell's batch; its one-hot conditions the decoder (none)",
    )
    train.add_argument(
        "--encode-covariates",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --batch-key, also feed the batch to the encoder; needed for a reference "
        "that `scvae-tools map` maps queries onto (off)",
    )
    train.add_argument("--beta", type=float, default=2.0, help="KL weight, vae/vsc (2.0)")
    train.add_argument(
        "--kl-warmup",
        type=float,
        default=0.0,
        help="fraction of the epochs over which the KL weight rises from 0 to beta, vae/vsc (0)",
    )
    train.add_argument(
        "--prior-spike", type=float, default=0.5, help="prior spike probability, vsc (0.5)"
    )
    train.add_argument("--key-added", default=None, help="obsm/uns key instead of the default")
    train.add_argument("--save-model", default=None, help="also save the fitted model (.pt)")
    train.add_argument(
        "--backed",
        action="store_true",
        help="train out of core: read X from disk in shuffled blocks while training instead of "
        "loading it (needs CSR or dense X on disk); for files larger than memory, and with "
        "--nproc so that the processes do not each load the whole file. OUT is a copy of the "
        "input file with the latent space added",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (torch.distributed with "
        "DistributedDataParallel; gloo on CPUs, NCCL on GPUs); each trains on its shard of the "
        "cells and --batch-size is split between them. For several machines, start the "
        "command with torchrun instead (1)",
    )
    _add_training_options(train)

    mapping = sub.add_parser(
        "map",
        help="map a query .h5ad onto a saved reference model (scArches' surgery)",
        description=(
            "Train only new one-hot batch columns of a saved model (from `train --batch-key COL "
            "--encode-covariates --decoder linear --save-model MODEL.pt`) on the query's new "
            "batches, the reference's weights frozen, and write the query's latent space "
            "(obsm['X_<model>'], uns['<model>']) into OUT. With --reference and --labels-key, "
            "also transfer the reference's labels by a weighted kNN vote (obs['<labels>_pred'], "
            "obs['<labels>_uncertainty'])."
        ),
    )
    mapping.add_argument("model_file", metavar="MODEL", help="model file (.pt) from --save-model")
    mapping.add_argument("input", help="query .h5ad file")
    mapping.add_argument("-o", "--output", required=True, help="output .h5ad file")
    mapping.add_argument(
        "--batch-key", default=None, help="obs column with each query cell's batch (the model's)"
    )
    mapping.add_argument("--layer", default=None, help="use this layer instead of X")
    mapping.add_argument(
        "--epochs",
        type=_int_or_auto,
        default="auto",
        help="passes over the query's cells, or 'auto' (the rule of train) (auto)",
    )
    mapping.add_argument("--batch-size", type=int, default=256, help="cells per minibatch (256)")
    mapping.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    mapping.add_argument("--seed", type=int, default=0, help="random_state (0)")
    mapping.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    mapping.add_argument("--key-added", default=None, help="obsm/uns key instead of the default")
    mapping.add_argument("--save-model", default=None, help="also save the extended model (.pt)")
    mapping.add_argument(
        "--reference",
        default=None,
        help="reference .h5ad (the model's genes and batch column) whose labels to transfer",
    )
    mapping.add_argument("--labels-key", default=None, help="obs column of the reference labels")
    mapping.add_argument(
        "--n-neighbors", type=int, default=15, help="reference neighbours per query cell (15)"
    )
    mapping.add_argument(
        "--unknown-threshold",
        type=float,
        default=0.5,
        help="label cells whose vote uncertainty exceeds this 'Unknown' (0.5)",
    )
    mapping.add_argument("--quiet", action="store_true", help="no progress bar")

    reproduce = sub.add_parser(
        "reproduce",
        help="train the three models, evaluate them and write figures, a CSV and a report",
        description=(
            "Rerun the write-up's comparison: train the deep AE, beta-VAE and beta-VSC, score "
            "their t-SNE + k-means partitions against labels, and write figures (PNG), "
            "metrics.csv and report.md into --out. Without --data, runs on scanpy's bundled "
            "pbmc68k_reduced with its bulk_labels."
        ),
    )
    reproduce.add_argument(
        "--data",
        default=None,
        help="'pbmc3k' (downloaded like sc.datasets.pbmc3k, then the Seurat recipe), a 10x "
        "folder, or an .h5ad file (default: pbmc68k_reduced)",
    )
    reproduce.add_argument("--labels", default=None, help="obs column with the labels")
    reproduce.add_argument("--out", default="scvae_reproduce", help="output folder")
    reproduce.add_argument(
        "--epochs", type=int, default=200, help="epochs per model (200, the write-up's)"
    )
    reproduce.add_argument(
        "--n-seeds", type=int, default=5, help="seeds of the t-SNE + k-means protocol (5)"
    )
    reproduce.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _launched_world() -> int:
    """Processes of the launcher that started this one (torchrun, or --nproc); 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_train_input(args: argparse.Namespace) -> int:
    """Check the input before anything starts or is written; returns its number of cells."""
    import anndata as ad
    import scanpy as sc

    from ._data import check_backed_format, get_matrix

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}.")
    if args.nproc > 1 and _launched_world() > 1:
        raise ValueError(
            "--nproc was given inside a torchrun launch, which starts the processes itself: "
            "drop --nproc (torchrun's --nproc-per-node sets their number)."
        )
    if args.input is None:
        if args.backed:
            raise ValueError("--backed needs an input .h5ad file.")
        return sc.datasets.pbmc68k_reduced().n_obs
    path = Path(args.input)
    if not path.is_file():
        what = "is a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"Input file {args.input!r} {what}. Pass the path of an .h5ad file, or no input to "
            "train on pbmc68k_reduced."
        )
    adata = ad.read_h5ad(path, backed="r")
    try:
        X = get_matrix(adata, args.layer)
        if args.backed:
            name = "X" if args.layer is None else f"layer {args.layer!r}"
            check_backed_format(X, name=f"{name} of {args.input}")
        return adata.n_obs
    finally:
        adata.file.close()


def _train(args: argparse.Namespace) -> int:
    n_obs = _check_train_input(args)
    if args.nproc > n_obs:
        raise ValueError(
            f"--nproc {args.nproc} is more than the {n_obs} cells of the input: each process "
            f"needs at least one cell. Use --nproc {n_obs} or fewer."
        )
    if args.nproc > 1:
        return _launch(args)
    return _train_worker(args)


def _launch(args: argparse.Namespace) -> int:
    """Run :func:`_train_worker` in ``args.nproc`` processes with torch's elastic launcher."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torchrun --standalone: a rendezvous on a free local port, no restarts.
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=args.nproc,
        run_id=f"scvae-tools-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, _spawned_worker)(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        raise WorkerFailedError(f"process {rank} of {args.nproc} failed: {message}") from None
    return 0


def _spawned_worker(args: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_train_worker)(args)


def _train_worker(args: argparse.Namespace) -> int:
    """Train in this process: alone, or as one worker of a launch (--nproc or torchrun)."""
    import torch
    import torch.distributed as dist

    world = _launched_world()
    device = args.device
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        elif "OMP_NUM_THREADS" not in os.environ:
            # The processes of a machine share its cores (torchrun would set 1 thread each).
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        return _train_in_process(args, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _write_backed_output(adata: Any, args: argparse.Namespace, keys: list[str], key: str) -> None:
    """OUT as a copy of the input file plus the new obsm and uns keys, X never in memory."""
    import shutil

    import h5py
    from anndata.io import write_elem

    partial = Path(f"{args.output}.partial")
    shutil.copyfile(args.input, partial)
    try:
        with h5py.File(partial, "r+") as f:
            if "obsm" not in f:
                write_elem(f, "obsm", {})
            if "uns" not in f:
                write_elem(f, "uns", {})
            for k in keys:
                write_elem(f["obsm"], k, adata.obsm[k])
            write_elem(f["uns"], key, adata.uns[key])
        os.replace(partial, args.output)
    finally:
        partial.unlink(missing_ok=True)


def _train_in_process(args: argparse.Namespace, device: str) -> int:
    import anndata as ad
    import scanpy as sc

    from . import tl
    from ._training import process_group

    if args.input is None:
        adata = sc.datasets.pbmc68k_reduced()
        source = "scanpy's bundled pbmc68k_reduced"
    else:
        adata = ad.read_h5ad(args.input, backed="r" if args.backed else None)
        source = args.input + (" (backed)" if args.backed else "")
    options = {
        "n_latent": args.n_latent,
        "hidden": tuple(args.hidden),
        "first_activation": args.first_activation,
        "layer": args.layer,
        "likelihood": args.likelihood,
        "batch_key": args.batch_key,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "early_stopping": args.early_stopping,
        "lr": args.lr,
        "random_state": args.seed,
        "device": device,
        "precision": args.precision,
        "key_added": args.key_added,
        "progress": not args.quiet,
        "return_model": True,
    }
    # Unset: the tools' own defaults, stated (and chosen) in one place.
    for name in ("decoder", "activation", "linear_path", "encode_covariates"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.model in ("vae", "vsc"):
        options["beta"] = args.beta
        options["kl_warmup"] = args.kl_warmup
    if args.model == "vsc":
        options["prior_spike"] = args.prior_spike
    model = getattr(tl, args.model)(adata, **options)
    rank, world = process_group()
    if rank > 0:  # rank 0 writes for all
        return 0
    key = args.key_added or args.model
    obsm_key = args.key_added or f"X_{args.model}"
    if args.backed:
        spike = [f"{obsm_key}_spike"] if args.model == "vsc" else []
        _write_backed_output(adata, args, [obsm_key, *spike], key)
    else:
        adata.write_h5ad(args.output)
    if args.save_model:
        model.save(args.save_model)
    record = adata.uns[key]
    params = record["params"]
    processes = f" with {world} processes" if world > 1 else ""
    print(
        f"Trained {args.model} on {source} ({adata.n_obs} cells x {adata.n_vars} genes)"
        f"{processes} for {params['epochs']} epochs of batches of {params['batch_size']}"
        f"{_stopped(params)} in "
        f"{record['training_time_s']:.1f} s ({record['seconds_per_epoch']:.3f} s/epoch); "
        f"final loss {record['history']['loss'][-1]:.4g}. Wrote obsm[{obsm_key!r}] "
        f"{adata.obsm[obsm_key].shape} to {args.output}."
    )
    return 0


def _stopped(params: dict) -> str:
    """Where early stopping stopped, for the summary line; empty without it."""
    if not params.get("early_stopping"):
        return ""
    if not params["stopped_early"]:
        return f" (no early stop; best held-out loss at step {params['best_step']})"
    return (
        f" (stopped early at step {params['n_steps']}, weights of step {params['best_step']} "
        "restored)"
    )


def _input_file(path: str, what: str) -> Path:
    """``path`` as a Path, or a clear error unless it is a file."""
    file = Path(path)
    if not file.is_file():
        state = "is a folder" if file.exists() else "does not exist"
        raise FileNotFoundError(f"{what} {path!r} {state}.")
    return file


def _map(args: argparse.Namespace) -> int:
    """``scvae-tools map``: map a query, optionally transfer a reference's labels."""
    import anndata as ad

    from . import models, tl
    from ._data import obs_column
    from .tl._mapping import UNKNOWN

    if (args.reference is None) != (args.labels_key is None):
        raise ValueError("--reference and --labels-key go together: pass both or neither.")
    model = models.load(_input_file(args.model_file, "Model file"))
    query = ad.read_h5ad(_input_file(args.input, "Input file"))
    reference = None
    if args.reference is not None:
        reference = ad.read_h5ad(_input_file(args.reference, "Reference file"))
        obs_column(reference, args.labels_key, argument="--labels-key", what="label")
    extended = tl.map_query(
        query,
        model,
        layer=args.layer,
        batch_key=args.batch_key,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        random_state=args.seed,
        device=args.device,
        key_added=args.key_added,
        progress=not args.quiet,
        return_model=True,
    )
    key = args.key_added or model.kind
    obsm_key = args.key_added or f"X_{model.kind}"
    transferred = ""
    if reference is not None:
        # The reference's batches are all known: this encodes it (bit-identical to the
        # reference model's codes), genes matched as for the query, without training.
        tl.map_query(reference, extended, layer=args.layer, key_added=obsm_key, progress=False)
        tl.transfer_labels(
            reference,
            query,
            args.labels_key,
            use_rep=obsm_key,
            n_neighbors=args.n_neighbors,
            unknown_threshold=args.unknown_threshold,
        )
        unknown = int((query.obs[f"{args.labels_key}_pred"] == UNKNOWN).sum())
        transferred = (
            f" Transferred {args.labels_key!r} from {reference.n_obs} reference cells "
            f"({unknown} query cells 'Unknown')."
        )
    query.write_h5ad(args.output)
    if args.save_model:
        extended.save(args.save_model)
    params = query.uns[key]["params"]
    print(
        f"Mapped {query.n_obs} cells of {args.input} onto the {model.kind} model "
        f"{args.model_file}: {len(params.get('new_batch_categories', []))} new batch(es), "
        f"{params['epochs']} epochs. Wrote obsm[{obsm_key!r}] {query.obsm[obsm_key].shape} to "
        f"{args.output}.{transferred}"
    )
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ._reproduce import reproduce

    reproduce(
        out=args.out,
        data=args.data,
        labels=args.labels,
        epochs=args.epochs,
        n_seeds=args.n_seeds,
        progress=not args.quiet,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "map":
            return _map(args)
        return _reproduce(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, WorkerFailedError) as err:
        print(f"scvae-tools: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
