"""``sv.tl.ae``, ``sv.tl.vae`` and ``sv.tl.vsc``: train a model on an AnnData, write its latent."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData

from .._checks import check_bool, check_choice, check_float, check_int
from .._data import (
    MinibatchLoader,
    batch_covariates,
    check_backed_format,
    gene_std,
    get_matrix,
    is_backed,
    principal_axes,
    validate_matrix,
)
from .._schedule import Auto, held_out_rows, patience_steps, training_schedule
from .._training import (
    PRECISIONS,
    EarlyStopping,
    Precision,
    TrainingDivergedError,
    gather_rows,
    process_group,
    train,
)
from ..models._likelihood import LIKELIHOODS, LikelihoodName
from ..models._model import MODEL_LATENT, LatentModel, ModelKind
from ..models._module import DECODER_WIDTHS, LATENT_TYPES, ActivationKind, DecoderKind
from ..models._nn import ACTIVATIONS

__all__ = ["ae", "vae", "vsc"]

Device = Literal["auto", "cpu", "cuda"] | str


def _check_hidden(hidden: Any) -> tuple[int, ...]:
    if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if not isinstance(hidden, Sequence) or isinstance(hidden, str) or len(hidden) == 0:
        raise ValueError(
            f"`hidden` must be a non-empty sequence of layer widths such as (128, 32, 16), "
            f"got {hidden!r}."
        )
    return tuple(check_int("hidden", h) for h in hidden)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when torch sees a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu' or 'cuda'.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no GPU. Use device='auto'.")
    return dev


def has_native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (AVX512-BF16/AMX, or a GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN
        return False


def _first_activation(value: Any, likelihood: str) -> bool:
    """``first_activation``, with ``"auto"`` resolved: a ReLU for the count likelihoods only.

    The Gaussian keeps the write-up's linear first layer. On counts, the ReLU (scVI's encoder
    has one too) lifted the batch-aware VAE's scIB total on PBMC3k in two batches, 3 training
    seeds each: NB from 0.759-0.768 to 0.774-0.792, ZINB from 0.755-0.772 to 0.773-0.803.
    """
    if isinstance(value, str) and value == "auto":
        return LIKELIHOODS[likelihood].counts
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`first_activation` must be True, False or 'auto', got {value!r}.")
    return bool(value)


def _decoder(value: Any, batch_key: str | None) -> str:
    """``decoder``, with ``"auto"`` resolved: linear for one sample, shallow with batches.

    Chosen on the benchmark suite (documentation's suite page), 3 training seeds per set: the
    linear decoder brought every model level with PCA on single samples (the write-up's MLP
    left them 0.03-0.15 below), but with batches it cannot explain a batch effect that differs
    between cell types, so the code keeps the batch (Drop-seq against inDrops: batch
    correction 0.36-0.56); one hidden layer, as scVI's decoder, removes it.
    """
    if isinstance(value, str) and value == "auto":
        return "linear" if batch_key is None else "shallow"
    return check_choice("decoder", value, tuple(DECODER_WIDTHS))


def _activation(value: Any, kind: ModelKind) -> str:
    """``activation``, with ``"auto"`` resolved: the latent type's own (a leaky ReLU for the AE).

    Trained by the reconstruction alone, the AE's ReLUs die; on all genes of a small plate that
    collapsed the code on two of three seeds (the documentation's suite page).
    """
    if isinstance(value, str) and value == "auto":
        return LATENT_TYPES[MODEL_LATENT[kind]].default_activation
    return check_choice("activation", value, tuple(ACTIVATIONS))


def _linear_path(value: Any, kind: ModelKind, likelihood: str, batch_key: str | None) -> bool:
    """``linear_path``, with ``"auto"`` resolved: the latent type's own, for one Gaussian batch.

    The principal axes of several batches carry the batch effect into the code, and the count
    likelihoods' encoder input, ``log1p`` of the raw counts, is not normalised for depth;
    neither case was measured with the path.
    """
    if isinstance(value, str) and value == "auto":
        own = LATENT_TYPES[MODEL_LATENT[kind]].default_linear_path
        return own and batch_key is None and not LIKELIHOODS[likelihood].counts
    return check_bool("linear_path", value)


def _fit(
    kind: ModelKind,
    adata: AnnData,
    *,
    model_options: dict[str, Any],
    n_latent: int,
    hidden: Sequence[int],
    layer: str | None,
    likelihood: LikelihoodName,
    batch_key: str | None,
    epochs: int | Auto,
    batch_size: int,
    early_stopping: bool,
    lr: float,
    random_state: int,
    device: Device,
    precision: Precision,
    key_added: str | None,
    progress: bool,
    return_model: bool,
    copy: bool,
) -> AnnData | LatentModel | tuple[AnnData, LatentModel] | None:
    # Everything is checked and computed before the AnnData is touched, so any failure (bad
    # input, divergence, Ctrl-C) leaves it exactly as it was.
    n_latent = check_int("n_latent", n_latent)
    hidden = _check_hidden(hidden)
    lr = check_float("lr", lr, low=0.0, open_low=True)
    random_state = check_int("random_state", random_state, minimum=0)
    early_stopping = check_bool("early_stopping", early_stopping)
    if key_added is not None and (not isinstance(key_added, str) or not key_added):
        raise ValueError(f"`key_added` must be a non-empty string or None, got {key_added!r}.")
    dev = resolve_device(device)
    precision = check_choice("precision", precision, tuple(PRECISIONS))
    if precision == "bfloat16" and not has_native_bfloat16(dev):
        warnings.warn(
            f"precision='bfloat16' is slower than 'float32' on this {dev.type.upper()}: it has "
            "no native bfloat16 matrix instructions (AVX512-BF16 or AMX on a CPU). Leave the "
            "default precision='float32'.",
            UserWarning,
            stacklevel=3,
        )

    likelihood = check_choice("likelihood", likelihood, tuple(LIKELIHOODS))
    check_bool("encode_covariates", model_options["encode_covariates"])
    model_options = {
        **model_options,
        "first_activation": _first_activation(model_options["first_activation"], likelihood),
        "decoder": _decoder(model_options["decoder"], batch_key),
        "activation": _activation(model_options["activation"], kind),
        "linear_path": _linear_path(model_options["linear_path"], kind, likelihood, batch_key),
    }
    covariates, categories = None, []
    if batch_key is not None:
        covariates, categories = batch_covariates(adata, batch_key)

    X = get_matrix(adata, layer)
    matrix_name = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    held = held_out_rows(X.shape[0], random_state) if early_stopping else None
    n_train = X.shape[0] - (0 if held is None else len(held))
    step_factor = LATENT_TYPES[MODEL_LATENT[kind]].step_factor
    schedule = training_schedule(n_train, epochs, batch_size, step_factor)
    batch_size = schedule.batch_size
    stopper = EarlyStopping(patience_steps(schedule)) if early_stopping else None
    counts_for = likelihood if LIKELIHOODS[likelihood].counts else None
    backed = is_backed(X)
    if backed:
        # No pass of its own over data on disk: its NaN/inf check happens as training reads it.
        check_backed_format(X, name=matrix_name)
    validate_matrix(X, name=matrix_name, counts_for=counts_for, first_block_only=backed)
    rank, world = process_group()
    if world > n_train:
        raise ValueError(
            f"{world} data-parallel processes for {n_train} training cells: use at most as "
            "many processes as cells."
        )

    config = {"n_latent": n_latent, "hidden": list(hidden), **model_options}
    config["likelihood"] = likelihood
    # Weight initialisation draws from torch's global generator: fork it so the caller's random
    # state is untouched and the same random_state always gives the same weights.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(random_state)
        model = LatentModel(
            kind, adata.var_names, config, batch_key=batch_key, batch_categories=categories
        )
    if model.module.linear_decoder:
        # PyTorch's initial W adds the same noise to every gene: on all ~14,000 genes of a data
        # set it swamps the few hundred that vary, the first steps shrink the codes, and the
        # default length does not recover (suite page: kNN purity 0.21-0.66 against PCA's
        # 0.86-0.96). Scaled by each gene's spread, the noise follows each gene's own variance.
        spread = gene_std(
            X, log1p=LIKELIHOODS[likelihood].counts, random_state=random_state, name=matrix_name
        )
        model.module.likelihood.scale_output_weights(torch.from_numpy(spread))
    if model.module.linear_path:
        mean, components, variance = principal_axes(
            X,
            n_latent,
            log1p=LIKELIHOODS[likelihood].counts,
            random_state=random_state,
            name=matrix_name,
        )
        # One factor for all axes keeps PCA's relative geometry; the mean variance of 1 per
        # dimension puts the codes on the prior's scale.
        scale = 1.0 / float(np.sqrt(variance.mean())) if variance.mean() > 0 else 1.0
        model.module.init_linear_path(torch.from_numpy(components), torch.from_numpy(mean), scale)
    model.module.to(dev)
    # batch_size is the minibatch of all processes together, so one process or several take the
    # same optimisation steps.
    loader = MinibatchLoader(
        X,
        -(-batch_size // world),
        device=dev,
        covariates=covariates,
        rank=rank,
        world_size=world,
        name=matrix_name,
        held_out=held,
    )
    description = f"sv.tl.{kind}: {schedule.describe()}"
    if stopper is not None:
        description += f", early stopping on {len(held)} held-out cells"
    result = train(
        model.module,
        loader,
        epochs=schedule.epochs,
        lr=lr,
        random_state=random_state,
        precision=precision,
        progress=progress,
        description=description,
        early_stopping=stopper,
    )
    model.module.eval()
    # Each process encodes its contiguous part of the cells; every one gets them all, in order.
    shard = -(-X.shape[0] // world)
    start, stop = min(rank * shard, X.shape[0]), min((rank + 1) * shard, X.shape[0])
    encoded = model._encode_matrix(
        X,
        batch_size=max(batch_size, 4096),
        return_spike=kind == "vsc",
        covariates=covariates,
        start=start,
        stop=stop,
    )
    rep, spike = encoded if kind == "vsc" else (encoded, None)
    rep = gather_rows(rep, X.shape[0], dev)
    spike = None if spike is None else gather_rows(spike, X.shape[0], dev)
    if not np.isfinite(rep).all():
        raise TrainingDivergedError(
            "Training produced non-finite latent values. Try a lower learning rate "
            f"(lr={lr:g} now)."
        )

    params = {
        "model": kind,
        "n_latent": n_latent,
        "hidden": np.asarray(hidden),
        **model_options,
        "layer": "X" if layer is None else layer,
        "likelihood": likelihood,
        **({"batch_key": batch_key, "batch_categories": categories} if batch_key else {}),
        "epochs": result.epochs,
        "batch_size": batch_size,
        "n_steps": result.steps,
        "epochs_auto": schedule.epochs_auto,
        "early_stopping": early_stopping,
        **(
            {
                "max_epochs": schedule.epochs,
                "n_held_out": len(held),
                "patience_steps": stopper.patience,
                "stopped_early": result.epochs < schedule.epochs,
                "best_epoch": result.best_epoch,
                "best_step": result.best_step,
            }
            if stopper is not None
            else {}
        ),
        "lr": lr,
        "random_state": random_state,
        "device": str(dev),
        "precision": precision,
        "n_obs": int(X.shape[0]),
        "n_vars": int(X.shape[1]),
        "backed": backed,
        "n_processes": world,
    }
    record = {
        "params": params,
        "history": result.history,
        "training_time_s": result.seconds,
        "seconds_per_epoch": result.seconds / result.epochs,
    }

    target = adata.to_memory() if copy and adata.isbacked else adata.copy() if copy else adata
    obsm_key = key_added or f"X_{kind}"
    target.obsm[obsm_key] = rep
    if spike is not None:
        target.obsm[f"{obsm_key}_spike"] = spike
    target.uns[key_added or kind] = record

    if copy and return_model:
        return target, model
    if copy:
        return target
    if return_model:
        return model
    return None


_COMMON_DOC = """
    n_latent
        Number of latent dimensions.
    hidden
        Encoder widths. ``(128, 32, 16)`` is the write-up's
        ``n_genes -> 128 -> 32 -> 16 -> n_latent``.
    decoder
        ``"linear"``: one linear layer from the code (and the one-hot batch) to the genes, as
        scvi-tools' LDVAE. ``"shallow"``: one hidden layer as wide as the encoder's first,
        ``n_latent -> 128 -> n_genes`` (ReLU), as scVI's decoder. ``"mlp"``: the encoder's
        widths mirrored, ``n_latent -> 16 -> 32 -> 128 -> n_genes`` (ReLU), the write-up's.
        The batch's one-hot (``batch_key``) enters every layer. ``"auto"``: ``"linear"``
        without ``batch_key``, ``"shallow"`` with it; ``params`` records which. The
        documentation's suite page gives the measurements behind the default.
    first_activation
        Put the activation (``activation``) after the encoder's first layer. ``"auto"``: only
        with a count likelihood.
        The write-up's encoder has none (its first layer is a linear projection), and the
        Gaussian keeps it so: on PBMC3k the ReLU helped with 2,000 HVGs but not with all genes
        (see the reproduce page of the documentation). On counts, as in scVI's encoder, it
        lifted the batch-aware VAE's integration scores (see the integration page).
    activation
        The hidden layers' activation: ``"relu"`` (the write-up's) or ``"leaky_relu"`` (slope
        0.01). ``"auto"``: ``"leaky_relu"`` for the AE, ``"relu"`` for the VAE and the VSC;
        ``params`` records which. Trained by the reconstruction alone, the AE's ReLUs die,
        which collapsed its code on small plates with all genes (the suite page).
    linear_path
        Add a linear map from the input to the code (the AE's code, the VAE's and the VSC's
        mean), started at the input's leading ``n_latent`` principal axes (of at most 4,000
        cells drawn at random; one factor scales them all to a mean variance of 1), and start
        the nonlinear encoder's output at zero, as a residual. The code then starts with PCA's
        geometry and moves away only where training gains. ``"auto"``: on for the AE and the
        VAE with the Gaussian likelihood and no ``batch_key``; off for the VSC (its code
        collapsed on some seeds with the path), with batches (their principal axes carry the
        batch effect) and with counts (not measured); ``params`` records which. The suite page
        gives the measurements.
    layer
        Train on ``adata.layers[layer]`` instead of ``adata.X``.
    likelihood
        The reconstruction's likelihood. ``"gaussian"`` (the default, the write-up's): squared
        error on log-normalised data. ``"nb"`` (negative binomial), ``"zinb"``
        (zero-inflated negative binomial) or ``"poisson"``: raw counts, as in scVI and DCA;
        the decoder gives each gene's proportion of the cell's observed library size, with a
        gene-wise dispersion (NB, ZINB) and zero-inflation logits (ZINB), and the encoder
        sees ``log1p`` of the counts. Pass the counts with ``layer="counts"`` (or in ``X``);
        anything but non-negative integers raises. Sparse counts stay sparse. The formulas
        are in :class:`~scvae_tools.models.NegativeBinomialLikelihood` and
        :class:`~scvae_tools.models.ZINBLikelihood`.
    batch_key
        Categorical column of ``adata.obs`` with each cell's batch (sample, donor,
        protocol). Its one-hot is fed to every layer of the decoder (as scVI), so that the
        latent space need not encode the batch. None: one batch (today's model, exactly).
    encode_covariates
        With ``batch_key``, also feed the one-hot batch to the encoder's first layer (scVI's
        ``encode_covariates``).
    epochs
        Passes over all cells. ``"auto"``: at least 2,200 optimizer steps (the write-up's 200
        epochs on PBMC3k), so more epochs below 2,560 cells, and twice as many for the AE,
        which converges more slowly; otherwise scVI's
        ``round(8e6 / n_obs)``, capped at 200 (8 epochs for a million cells). An integer is
        obeyed exactly. The documentation's models page explains the rule.
    batch_size
        Cells per minibatch (with several data-parallel processes, of all of them together:
        each takes ``ceil(batch_size / n_processes)``).
    early_stopping
        Hold 10 % of the cells out of training (at most 10,000, drawn with ``random_state``),
        compute their loss after every epoch, stop once it has not improved for
        ``max(300, n_steps / 10)`` optimizer steps, and restore the weights of the best epoch,
        as scvi-tools' ``early_stopping``. ``epochs`` (or ``"auto"``'s choice, for the other
        90 % of the cells) is then the most that run. The held-out cells are encoded like the
        others. Off by default: see the models page of the documentation for what it changed
        on small and large data.
    lr
        Adam learning rate.
    random_state
        Seed of the weight initialisation, the minibatch order and the latent samples. Local
        generators are used: the global NumPy and torch random states are left untouched.
        Backed data is shuffled by blocks of rows (see Notes), so its result differs from
        the same call in memory unless its cells fit in one read window; the same
        ``random_state`` gives the same result either way.
    device
        ``"auto"`` (a GPU when torch sees one, else the CPU), ``"cpu"`` or ``"cuda"``.
    precision
        ``"float32"``, or ``"bfloat16"`` to compute the output layer's products in bfloat16:
        its Gram matrix and its product with the minibatch, and their gradients (most of the
        arithmetic of a step). Weights, optimizer, the other layers and the latent space
        written to ``obsm`` stay float32. On CPUs with native bfloat16 instructions
        (AVX512-BF16 or AMX) this is 14-23 % faster per epoch with ~14,000 genes (a few per
        cent with 2,000); elsewhere it is slower, and a warning says so. On PBMC3k the latent
        spaces score as float32's do, within the spread of training seeds, but not
        bit-identically (see the benchmarks page of the documentation).
    key_added
        Write ``obsm[key_added]`` and ``uns[key_added]`` instead of the defaults.
    progress
        Show a progress bar over epochs with the current loss; False prints nothing.
    return_model
        Also return the fitted :class:`~scvae_tools.models.LatentModel`.
    copy
        Work on a copy of ``adata`` and return it.

    Returns
    -------
    None, or the copy with ``copy=True``, or the model with ``return_model=True``, or
    ``(adata, model)`` with both. Sets:

    ``adata.obsm["X_{name}"]`` : :class:`numpy.ndarray` ``(n_obs, n_latent)``, float32
        {rep}
    ``adata.uns["{name}"]`` : :class:`dict`
        ``params`` (every argument that shaped the result, plus ``n_obs``, ``n_vars``, the
        ``layer`` used, ``"X"`` for ``adata.X``, the ``likelihood``, with a ``batch_key`` the
        ``batch_categories`` in order, ``backed`` and ``n_processes``; ``epochs`` and
        ``batch_size`` are the values that ran, ``n_steps`` the optimizer steps, and
        ``epochs_auto`` says whether the rule chose the epochs; with ``early_stopping``, also
        ``max_epochs``, ``n_held_out``, ``patience_steps``, ``stopped_early`` and the
        ``best_epoch`` and ``best_step`` whose weights were kept), ``history`` (one value per
        epoch of ``loss`` and each of its terms, averaged over cells: ``reconstruction`` is the
        squared error, or for a count likelihood the negative log-likelihood of the counts,
        summed over genes; with ``early_stopping``, ``held_out_loss``, the loss of the
        held-out cells with the full ``beta`` and the posterior mean as code),
        ``training_time_s`` and ``seconds_per_epoch``.
{extra}
    Notes
    -----
    The input is any numeric matrix (dense or sparse, integer or float; AnnData views and
    ``backed="r"`` work too); sparse data stays sparse. With the default Gaussian likelihood
    it should be log-normalised (``sc.pp.normalize_total`` + ``sc.pp.log1p``): the
    reconstruction error is the squared error summed over genes, averaged over the cells of a
    minibatch. Count likelihoods take raw counts.{beta_note}

    **Out of core.** On ``sc.read_h5ad(path, backed="r")`` (CSR or dense ``X`` on disk; CSC is
    refused) ``X`` is never loaded: each epoch shuffles the order of blocks of 512 contiguous
    rows, reads a window of blocks (about 16 million stored values) at a time, shuffles the
    cells within the window, and a background thread reads the next window meanwhile. NaN and
    infinite values are found as the epochs read them (an error, nothing written), not in a
    pass of their own before training; the raw-counts warning looks at the first 8,192 cells
    only. ``copy=True`` on backed data loads it into memory for the copy.

    **Several processes.** Python calls train in one process. When the call runs inside a
    ``torch.distributed`` process group (``scvae-tools train --nproc N``, or a script started by
    ``torchrun``), the module is wrapped in
    ``DistributedDataParallel``: every process trains on its shard of
    each epoch, the loss history is the mean over all cells, and every process receives the
    latent space of all cells, in order. See the Scaling page of the documentation.

    Raises
    ------
    ValueError
        NaN or infinite input, an empty AnnData, invalid hyperparameters, a count likelihood
        on values that are not counts, missing values in ``adata.obs[batch_key]``.
    KeyError
        ``layer`` is not in ``adata.layers``, ``batch_key`` not in ``adata.obs``.
    scvae_tools.TrainingDivergedError
        The loss became NaN; nothing is written.
"""

_KL_WARMUP_DOC = """
    kl_warmup
        Fraction of the epochs, in ``[0, 1]``, over which the KL weight rises linearly from 0
        to ``beta`` (0.5: the first half). 0, the write-up's setting, applies ``beta`` from the
        first epoch. On PBMC3k and ``pbmc68k_reduced`` a warm-up changed the scores by no
        more than a change of ``random_state`` does (see the reproduce page of the
        documentation)."""

_BETA_NOTE = (
    " ``beta`` multiplies the per-cell KL, so it is measured against the per-cell squared error "
    "summed over all genes: the same ``beta`` regularises less when there are more genes."
)


def _doc(name: str, rep: str, extra: str = "", beta_note: str = "") -> str:
    return _COMMON_DOC.format(name=name, rep=rep, extra=extra, beta_note=beta_note)


def ae(
    adata: AnnData,
    *,
    n_latent: int = 6,
    hidden: Sequence[int] = (128, 32, 16),
    decoder: DecoderKind | Auto = "auto",
    first_activation: bool | Auto = "auto",
    activation: ActivationKind | Auto = "auto",
    linear_path: bool | Auto = "auto",
    layer: str | None = None,
    likelihood: LikelihoodName = "gaussian",
    batch_key: str | None = None,
    encode_covariates: bool = False,
    epochs: int | Auto = "auto",
    batch_size: int = 256,
    early_stopping: bool = False,
    lr: float = 1e-3,
    random_state: int = 0,
    device: Device = "auto",
    precision: Precision = "float32",
    key_added: str | None = None,
    progress: bool = True,
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | LatentModel | tuple[AnnData, LatentModel] | None:
    return _fit(
        "ae",
        adata,
        model_options={
            "first_activation": first_activation,
            "activation": activation,
            "linear_path": linear_path,
            "decoder": decoder,
            "encode_covariates": encode_covariates,
        },
        n_latent=n_latent,
        hidden=hidden,
        layer=layer,
        likelihood=likelihood,
        batch_key=batch_key,
        epochs=epochs,
        batch_size=batch_size,
        early_stopping=early_stopping,
        lr=lr,
        random_state=random_state,
        device=device,
        precision=precision,
        key_added=key_added,
        progress=progress,
        return_model=return_model,
        copy=copy,
    )


def vae(
    adata: AnnData,
    *,
    beta: float = 2.0,
    kl_warmup: float = 0.0,
    n_latent: int = 6,
    hidden: Sequence[int] = (128, 32, 16),
    decoder: DecoderKind | Auto = "auto",
    first_activation: bool | Auto = "auto",
    activation: ActivationKind | Auto = "auto",
    linear_path: bool | Auto = "auto",
    layer: str | None = None,
    likelihood: LikelihoodName = "gaussian",
    batch_key: str | None = None,
    encode_covariates: bool = False,
    epochs: int | Auto = "auto",
    batch_size: int = 256,
    early_stopping: bool = False,
    lr: float = 1e-3,
    random_state: int = 0,
    device: Device = "auto",
    precision: Precision = "float32",
    key_added: str | None = None,
    progress: bool = True,
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | LatentModel | tuple[AnnData, LatentModel] | None:
    beta = check_float("beta", beta, low=0.0, open_low=False)
    kl_warmup = check_float("kl_warmup", kl_warmup, low=0.0, high=1.0, open_low=False)
    return _fit(
        "vae",
        adata,
        model_options={
            "beta": beta,
            "kl_warmup": kl_warmup,
            "first_activation": first_activation,
            "activation": activation,
            "linear_path": linear_path,
            "decoder": decoder,
            "encode_covariates": encode_covariates,
        },
        n_latent=n_latent,
        hidden=hidden,
        layer=layer,
        likelihood=likelihood,
        batch_key=batch_key,
        epochs=epochs,
        batch_size=batch_size,
        early_stopping=early_stopping,
        lr=lr,
        random_state=random_state,
        device=device,
        precision=precision,
        key_added=key_added,
        progress=progress,
        return_model=return_model,
        copy=copy,
    )


def vsc(
    adata: AnnData,
    *,
    beta: float = 2.0,
    kl_warmup: float = 0.0,
    prior_spike: float = 0.5,
    n_latent: int = 6,
    hidden: Sequence[int] = (128, 32, 16),
    decoder: DecoderKind | Auto = "auto",
    first_activation: bool | Auto = "auto",
    activation: ActivationKind | Auto = "auto",
    linear_path: bool | Auto = "auto",
    layer: str | None = None,
    likelihood: LikelihoodName = "gaussian",
    batch_key: str | None = None,
    encode_covariates: bool = False,
    epochs: int | Auto = "auto",
    batch_size: int = 256,
    early_stopping: bool = False,
    lr: float = 1e-3,
    random_state: int = 0,
    device: Device = "auto",
    precision: Precision = "float32",
    key_added: str | None = None,
    progress: bool = True,
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | LatentModel | tuple[AnnData, LatentModel] | None:
    beta = check_float("beta", beta, low=0.0, open_low=False)
    kl_warmup = check_float("kl_warmup", kl_warmup, low=0.0, high=1.0, open_low=False)
    prior_spike = check_float(
        "prior_spike", prior_spike, low=0.0, high=1.0, open_low=True, open_high=True
    )
    return _fit(
        "vsc",
        adata,
        model_options={
            "beta": beta,
            "kl_warmup": kl_warmup,
            "prior_spike": prior_spike,
            "first_activation": first_activation,
            "activation": activation,
            "linear_path": linear_path,
            "decoder": decoder,
            "encode_covariates": encode_covariates,
        },
        n_latent=n_latent,
        hidden=hidden,
        layer=layer,
        likelihood=likelihood,
        batch_key=batch_key,
        epochs=epochs,
        batch_size=batch_size,
        early_stopping=early_stopping,
        lr=lr,
        random_state=random_state,
        device=device,
        precision=precision,
        key_added=key_added,
        progress=progress,
        return_model=return_model,
        copy=copy,
    )


ae.__doc__ = """Deep autoencoder latent space (write-up section 2.4.1).

    Trains ``n_genes -> 128 -> 32 -> 16 -> n_latent -> 16 -> 32 -> 128 -> n_genes`` to minimise
    the squared reconstruction error, and stores the bottleneck code of every cell.

    Parameters
    ----------
    adata
        Annotated data matrix of shape ``(n_obs, n_vars)``, log-normalised (raw counts for a
        count ``likelihood``).""" + _doc("ae", "The bottleneck code of each cell.")

vae.__doc__ = (
    """β-VAE latent space (write-up section 2.4.2; Higgins et al., 2017).

    Minimises ``reconstruction + beta * KL(q(z|x) || N(0, I))`` and stores the posterior mean of
    every cell.

    Parameters
    ----------
    adata
        Annotated data matrix of shape ``(n_obs, n_vars)``, log-normalised (raw counts for a
        count ``likelihood``).
    beta
        Weight of the KL term."""
    + _KL_WARMUP_DOC
    + _doc("vae", "The posterior mean of each cell.", beta_note=_BETA_NOTE)
)

vsc.__doc__ = (
    """β-VSC latent space: variational sparse coding (Tonolini et al., 2019).

    A VAE with a spike-and-slab prior: each latent dimension of a cell is either exactly zero
    (spike) or Gaussian (slab). Minimises ``reconstruction + beta * (KL_slab + KL_spike)`` and
    stores the posterior mean ``gamma * mu`` of every cell. The sharpness of the relaxed spike
    selection is warmed up from 50 to 200 over training.

    Parameters
    ----------
    adata
        Annotated data matrix of shape ``(n_obs, n_vars)``, log-normalised (raw counts for a
        count ``likelihood``).
    beta
        Weight of the whole KL term (slab and spike)."""
    + _KL_WARMUP_DOC
    + """
    prior_spike
        Prior probability ``alpha`` that a latent dimension is active, in ``(0, 1)``."""
    + _doc(
        "vsc",
        "The posterior mean (spike probability x slab mean) of each cell.",
        extra=(
            '    ``adata.obsm["X_vsc_spike"]`` : :class:`numpy.ndarray` ``(n_obs, n_latent)``\n'
            "        Probability that each latent dimension of each cell is active, in [0, 1].\n"
            "        With ``key_added``, the key is ``key_added + '_spike'``.\n"
        ),
        beta_note=_BETA_NOTE,
    )
)
