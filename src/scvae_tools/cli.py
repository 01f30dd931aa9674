"""The ``scvae-tools`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

_MODELS = ("ae", "vae", "vsc")


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
        help="passes over all cells, or 'auto': at least 2,200 steps, else min(200, 8e6 / cells) "
        "(auto)",
    )
    parser.add_argument("--n-latent", type=int, default=6, help="latent dimensions (6)")
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=[128, 32, 16], help="encoder widths (128 32 16)"
    )
    parser.add_argument(
        "--first-activation",
        action="store_true",
        help="a ReLU after the encoder's first layer (the write-up has none)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="cells per minibatch (256)")
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
    _add_training_options(train)

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


def _train(args: argparse.Namespace) -> int:
    import anndata as ad
    import scanpy as sc

    from . import tl

    if args.input is None:
        adata = sc.datasets.pbmc68k_reduced()
        source = "scanpy's bundled pbmc68k_reduced"
    else:
        adata = ad.read_h5ad(args.input)
        source = args.input
    options = {
        "n_latent": args.n_latent,
        "hidden": tuple(args.hidden),
        "first_activation": args.first_activation,
        "layer": args.layer,
        "likelihood": args.likelihood,
        "batch_key": args.batch_key,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "random_state": args.seed,
        "device": args.device,
        "precision": args.precision,
        "key_added": args.key_added,
        "progress": not args.quiet,
        "return_model": True,
    }
    if args.model in ("vae", "vsc"):
        options["beta"] = args.beta
        options["kl_warmup"] = args.kl_warmup
    if args.model == "vsc":
        options["prior_spike"] = args.prior_spike
    model = getattr(tl, args.model)(adata, **options)
    adata.write_h5ad(args.output)
    if args.save_model:
        model.save(args.save_model)
    key = args.key_added or args.model
    record = adata.uns[key]
    params = record["params"]
    obsm_key = args.key_added or f"X_{args.model}"
    print(
        f"Trained {args.model} on {source} ({adata.n_obs} cells x {adata.n_vars} genes) for "
        f"{params['epochs']} epochs of batches of {params['batch_size']} in "
        f"{record['training_time_s']:.1f} s ({record['seconds_per_epoch']:.3f} s/epoch); "
        f"final loss {record['history']['loss'][-1]:.4g}. Wrote obsm[{obsm_key!r}] "
        f"{adata.obsm[obsm_key].shape} to {args.output}."
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
        return _reproduce(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        print(f"scvae-tools: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
