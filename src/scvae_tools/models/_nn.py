"""Building blocks shared by all three models: the MLP builder and the sparse-aware layers."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "Batch",
    "ConditionalMLP",
    "InputLinear",
    "InsertedColumns",
    "OutputLinear",
    "covariate_columns",
    "gram",
    "mlp",
    "output_products",
]


def _low(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return weight if dtype is None or dtype == weight.dtype else weight.to(dtype)


class _SparseMatmul(torch.autograd.Function):
    """``x @ weight`` for a CSR ``x``, differentiable in ``weight`` only.

    The forward pass is an ``embedding_bag`` sum over the genes of each cell. The backward pass,
    ``x.T @ grad``, is the same sum over the cells of each gene, read from the transposed batch
    that the data loader prepares: ``embedding_bag``'s own backward sorts the indices on every
    call, and ``torch.sparse.mm`` zero-fills and copies its output; both are 2-3x slower here.
    """

    @staticmethod
    def forward(ctx, weight, indices, offsets, values, transposed):
        ctx.transposed = transposed
        return F.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out):
        return _transposed_matmul(ctx.transposed, grad_out), None, None, None, None


def _transposed_matmul(transposed: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``x.T @ grad`` from the transposed batch (CSR, ``n_genes x n_cells``), as a sum per gene.

    Computed and returned in ``grad``'s type.
    """
    return F.embedding_bag(
        transposed.col_indices(),
        grad.contiguous(),
        transposed.crow_indices()[:-1],
        mode="sum",
        per_sample_weights=_low(transposed.values(), grad.dtype),
    )


@dataclass
class Batch:
    r"""A minibatch of cells, either dense or in CSR form.

    Sparse batches keep only the non-zeros: ``indices`` (gene of each non-zero), ``offsets``
    (start of each cell in ``indices``) and ``values``, plus the transposed batch as a torch CSR
    tensor (``transposed``, ``n_genes x n_cells``) for the backward pass.
    ``sq_norm`` is :math:`\lVert x \rVert^2` per cell, which the reconstruction loss needs.
    ``covariates`` is the one-hot batch of each cell, shape ``(n_cells, n_batches)``, or None
    when the model has no ``batch_key``.
    """

    n_cells: int
    sq_norm: torch.Tensor
    dense: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    values: torch.Tensor | None = None
    transposed: torch.Tensor | None = None
    covariates: torch.Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        """Whether the batch is held as CSR."""
        return self.dense is None

    @property
    def n_values(self) -> int:
        """How many values the batch stores (its non-zeros if sparse, all entries if dense)."""
        return (self.values if self.dense is None else self.dense).numel()

    def rows(self) -> torch.Tensor:
        """The cell of each stored non-zero of a sparse batch, shape ``(n_values,)``."""
        counts = torch.diff(
            self.offsets, append=self.offsets.new_tensor([self.values.numel()])
        ).long()
        return torch.repeat_interleave(
            torch.arange(self.n_cells, device=self.values.device), counts
        )

    def row_sums(self) -> torch.Tensor:
        r""":math:`\sum_g x_g` per cell, shape ``(n_cells,)``."""
        if self.dense is not None:
            return self.dense.sum(1)
        return self.values.new_zeros(self.n_cells).index_add_(0, self.rows(), self.values)

    def map_values(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with ``fn`` applied to every value; ``fn(0)`` must be 0.

        The sparsity pattern, and for training batches the transposed batch's, are shared, so
        this costs one pass over the stored values. ``sq_norm`` is not recomputed (None).
        """
        if self.dense is not None:
            return replace(self, dense=fn(self.dense), sq_norm=None)
        transposed = self.transposed
        if transposed is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
                transposed = torch.sparse_csr_tensor(
                    transposed.crow_indices(),
                    transposed.col_indices(),
                    fn(transposed.values()),
                    size=transposed.shape,
                    check_invariants=False,
                )
        return replace(self, values=fn(self.values), transposed=transposed, sq_norm=None)

    def matmul(self, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weight`` for a weight of shape ``(n_genes, k)``; returns ``(n_cells, k)``.

        For sparse batches this costs one multiply per non-zero, in the forward and the backward
        pass, and makes no dense copy of ``x``.
        """
        if self.dense is not None:
            return self.dense @ weight
        if self.transposed is None or not weight.requires_grad:
            return F.embedding_bag(
                self.indices, weight, self.offsets, mode="sum", per_sample_weights=self.values
            )
        return _SparseMatmul.apply(weight, self.indices, self.offsets, self.values, self.transposed)

    def to(self, device: torch.device) -> Batch:
        """Move every tensor to ``device``."""
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            self.n_cells,
            move(self.sq_norm),
            move(self.dense),
            move(self.indices),
            move(self.offsets),
            move(self.values),
            move(self.transposed),
            move(self.covariates),
        )


#: The hidden layers' activations, by the name that the tools' ``activation`` takes. The leaky
#: ReLU's slope of 0.01 is PyTorch's default: it keeps a gradient through a unit that is negative
#: for every cell, where a ReLU's unit is dead for good.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": partial(nn.LeakyReLU, 0.01),
}


def mlp(
    sizes: Sequence[int],
    *,
    last_activation: bool = True,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear layers with an activation (a ReLU by default) between them.

    Parameters
    ----------
    sizes
        Widths ``(in, h1, ..., out)``; a single width gives an empty (identity) module.
    last_activation
        Whether an activation follows the last layer too.
    activation
        Builds each activation module, such as a value of ``_nn.ACTIVATIONS``.

    Returns
    -------
    The layers as one :class:`torch.nn.Sequential`.
    """
    layers: list[nn.Module] = []
    n_layers = len(sizes) - 1
    for i in range(n_layers):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < n_layers - 1 or last_activation:
            layers.append(activation())
    return nn.Sequential(*layers)


class ConditionalMLP(nn.Sequential):
    """:func:`mlp` whose every linear layer also sees covariates (the one-hot batch), as scVI.

    ``[h, c]`` is fed to each linear layer, so the layers are ``nn.Linear(width + n_covariates,
    next_width)``. With ``n_covariates=0`` the layers, their initialisation and their
    parameter names are exactly those of :func:`mlp`.

    Parameters
    ----------
    sizes
        Widths ``(in, h1, ..., out)``, not counting the covariates.
    n_covariates
        Width of the covariates concatenated to each layer's input.
    last_activation
        Whether an activation follows the last layer too.
    activation
        Builds each activation module, such as a value of ``_nn.ACTIVATIONS``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        n_covariates: int = 0,
        *,
        last_activation: bool = True,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ):
        layers: list[nn.Module] = []
        n_layers = len(sizes) - 1
        for i in range(n_layers):
            layers.append(nn.Linear(sizes[i] + n_covariates, sizes[i + 1]))
            if i < n_layers - 1 or last_activation:
                layers.append(activation())
        super().__init__(*layers)
        self.n_covariates = n_covariates

    def forward(self, h: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """``h`` of shape ``(n_cells, in)``, covariates ``(n_cells, n_covariates)`` or None."""
        for layer in self:
            if self.n_covariates and isinstance(layer, nn.Linear):
                h = torch.cat([h, covariates], dim=1)
            h = layer(h)
        return h


class InputLinear(nn.Module):
    """The encoder's first layer, ``x -> W x + b``, fed sparse or dense batches.

    The weight is stored as ``(n_genes, n_out)`` so that a sparse batch can gather its rows.
    """

    def __init__(self, n_genes: int, n_out: int):
        super().__init__()
        layer = nn.Linear(n_genes, n_out)  # for PyTorch's default initialisation
        self.weight = nn.Parameter(layer.weight.detach().T.contiguous())
        self.bias = nn.Parameter(layer.bias.detach().clone())

    def forward(self, batch: Batch) -> torch.Tensor:
        """Shape ``(n_cells, n_out)``."""
        return batch.matmul(self.weight) + self.bias


class _Gram(torch.autograd.Function):
    """``weight.T @ weight`` with its gradient in one matrix product, ``W (G + G^T)``.

    Autograd would differentiate both factors separately: two ``n_genes x k x k`` products.
    With ``dtype`` (bfloat16), both products run in that type and return the weight's.
    """

    @staticmethod
    def forward(ctx, weight, dtype):
        low = _low(weight, dtype)
        ctx.save_for_backward(low)
        return (low.T @ low).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        (low,) = ctx.saved_tensors
        return (low @ (grad + grad.T).to(low.dtype)).to(grad.dtype), None


def gram(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gram matrix ``weight.T @ weight`` of a ``(n, k)`` weight; shape ``(k, k)``.

    ``dtype`` (e.g. ``torch.bfloat16``) is the type the product and its gradient are computed in;
    None computes them in the weight's own type.
    """
    return _Gram.apply(weight, dtype)


class _OutputProducts(torch.autograd.Function):
    """``x @ weight`` (sparse training batch) and ``weight.T @ weight``, differentiated together.

    Both products contribute to the gradient of the same ``n_genes``-row weight; computing it in
    one buffer (the sparse part, then ``addmm_`` of the Gram part) saves allocating, writing and
    adding a second ``n_genes x k`` gradient every step. With ``dtype`` (bfloat16), all four
    products (two forward, two backward) run in that type, on one rounded copy of the weight,
    and return the weight's type: the Gram products are most of a step's arithmetic, and the
    sparse ones gather half the bytes.
    """

    @staticmethod
    def forward(ctx, weight, indices, offsets, values, transposed, dtype):
        low = _low(weight, dtype)
        ctx.save_for_backward(low)
        ctx.transposed = transposed
        x_dot_weight = F.embedding_bag(
            indices, low, offsets, mode="sum", per_sample_weights=_low(values, low.dtype)
        )
        return x_dot_weight.to(weight.dtype), (low.T @ low).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_xw, grad_gram):
        (low,) = ctx.saved_tensors
        grad = _transposed_matmul(ctx.transposed, _low(grad_xw, low.dtype))
        grad.addmm_(low, _low(grad_gram + grad_gram.T, low.dtype))
        return grad.to(grad_xw.dtype), None, None, None, None, None


def output_products(
    batch: Batch, weight: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ weight, weight.T @ weight)``: what the Gram form of the squared error needs.

    Parameters
    ----------
    batch
        The minibatch ``x``, ``(n_cells, n_genes)``.
    weight
        Shape ``(n_genes, k)``.
    dtype
        Type in which both products and their gradients are computed (``torch.bfloat16`` for
        ``precision="bfloat16"``) when ``batch`` is a sparse training batch, and the Gram
        matrix otherwise; None: the weight's own.

    Returns
    -------
    Shapes ``(n_cells, k)`` and ``(k, k)``, in the weight's type.
    """
    if batch.is_sparse and batch.transposed is not None and weight.requires_grad:
        return _OutputProducts.apply(
            weight, batch.indices, batch.offsets, batch.values, batch.transposed, dtype
        )
    return batch.matmul(weight), gram(weight, dtype)


class OutputLinear(nn.Module):
    """The decoder's last layer, ``h -> W h + b``.

    ``W`` (``n_genes x n_hidden``, as in ``torch.nn.Linear``) and ``b`` are stored side by side
    in one parameter, ``packed``: ``[W b 0]``, with zero columns that round its width up to a
    multiple of 8. With ``n_covariates``, the layer is ``[h, c] -> W [h, c] + b``: the
    covariates (one-hot batch) are more columns of its input, and ``W`` has ``n_hidden +
    n_covariates`` columns; the Gram identity holds as before. The loss works on exactly this
    matrix and its Gram matrix
    (:func:`~scvae_tools.models.squared_error_gram`), which is exact and avoids the dense
    ``n_cells x n_genes`` output. The zero columns stay zero (their gradient is exactly zero,
    and so is Adam's step); they are there because the matrix products with a 129-column
    ``[W b]``, rows not a multiple of the vector width, take 40 % longer. Training never calls
    :meth:`forward`.
    """

    def __init__(self, n_hidden: int, n_genes: int, n_covariates: int = 0):
        super().__init__()
        n_in = n_hidden + n_covariates
        layer = nn.Linear(n_in, n_genes)  # for PyTorch's default initialisation
        packed = torch.zeros(n_genes, -(-(n_in + 1) // 8) * 8)
        packed[:, :n_in] = layer.weight.detach()
        packed[:, n_in] = layer.bias.detach()
        self.packed = nn.Parameter(packed)
        self.n_hidden = n_hidden
        self.n_covariates = n_covariates

    @property
    def weight(self) -> torch.Tensor:
        """``W``, a view of shape ``(n_genes, n_hidden + n_covariates)``."""
        return self.packed[:, : self.n_hidden + self.n_covariates]

    @property
    def bias(self) -> torch.Tensor:
        """``b``, a view of shape ``(n_genes,)``."""
        return self.packed[:, self.n_hidden + self.n_covariates]

    def augment(self, h: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """``[h c 1 0]``, shape ``(n_cells, packed width)``: ``packed @ [h c 1 0] = W [h c] + b``.

        ``covariates`` (``(n_cells, n_covariates)``) is ignored when the layer has none.
        """
        n_pad = self.packed.shape[1] - self.n_hidden - self.n_covariates - 1
        parts = [h, covariates] if self.n_covariates else [h]
        parts += [h.new_ones(h.shape[0], 1), h.new_zeros(h.shape[0], n_pad)]
        return torch.cat(parts, dim=1)

    def forward(self, h: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Dense reconstruction, shape ``(n_cells, n_genes)``."""
        if self.n_covariates:
            h = torch.cat([h, covariates], dim=1)
        return F.linear(h, self.weight, self.bias)


def covariate_columns(module: nn.Module, n_covariates: int) -> dict[str, int]:
    """Where the covariates enter the weights of ``module``, whose linear layers all read them.

    Every linear layer of a :class:`ConditionalMLP`, of a likelihood's output layers and of the
    encoder's covariate layer reads ``[h, c]``: its input ``h`` (possibly empty), then the
    ``n_covariates`` columns of the one-hot batch ``c``. This is the one place that knows it.

    Parameters
    ----------
    module
        A module whose :class:`torch.nn.Linear` and :class:`OutputLinear` layers all read
        ``n_covariates`` covariate columns after their other inputs.
    n_covariates
        Width of the covariates.

    Returns
    -------
    The name of each such weight (``"0.weight"``, ``"output_layer.packed"``) and the index of
    its first covariate column along dim 1; empty when ``n_covariates`` is 0.
    """
    if not n_covariates:
        return {}
    columns = {}
    for name, layer in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(layer, OutputLinear):
            columns[f"{prefix}packed"] = layer.n_hidden
        elif isinstance(layer, nn.Linear):
            columns[f"{prefix}weight"] = layer.in_features - n_covariates
    return columns


class InsertedColumns(nn.Module):
    """A parametrization: a frozen weight with trainable columns inserted along dim 1.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization` on a weight
    ``W`` of shape ``(n_out, n_in)``, it stores ``W`` without columns ``at:at + n`` as the
    (frozen) original and those columns as its own parameter ``columns``; the layer sees
    ``[W[:, :at], columns, W[:, at + n:]]``, rebuilt at every access. The original's values are
    never touched by an optimizer that only holds ``columns``.

    Parameters
    ----------
    weight
        The full weight, shape ``(n_out, n_in)``.
    at
        Index of the first trainable column.
    n
        Number of trainable columns.
    """

    def __init__(self, weight: torch.Tensor, at: int, n: int):
        super().__init__()
        self.at, self.n = int(at), int(n)
        self.columns = nn.Parameter(weight.detach()[:, self.at : self.at + self.n].clone())

    def forward(self, frozen: torch.Tensor) -> torch.Tensor:
        """The full weight, ``(n_out, n_in)``, from the frozen part ``(n_out, n_in - n)``."""
        return torch.cat([frozen[:, : self.at], self.columns, frozen[:, self.at :]], dim=1)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The frozen part of a full weight: every column but the inserted ones."""
        return torch.cat([weight[:, : self.at], weight[:, self.at + self.n :]], dim=1)
