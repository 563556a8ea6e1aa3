"""The methods ``benchmarks.train_lm`` compares: optimizer configurations by name (AdamW, FRUGAL's projections,
the low-rank baseline at matched state memory, signSGD, pure-bf16 AdamW, CollageAdamW, FRUGAL with Collage), the
optimizer each builds and the state it keeps, and the linear cross-entropy backend a run trains with."""
import dataclasses
import functools
from collections.abc import Sequence

import torch
from torch import nn

import leanops
from leanops import ops
from leanops.optim import FRUGAL, CollageAdamW, frugal_param_groups

from .. import measurement
from .data import PROGRAM, VOCABULARY


@dataclasses.dataclass
class Method:
    """One optimizer configuration: the dtype of the model's parameters, the optimizer ("adamw", "collage",
    "frugal") and its options. ``match_state_of``: for a low-rank (svd) FRUGAL, the method whose optimizer-state
    bytes the density is chosen to match (``matched_svd_density``)."""
    name: str
    description: str
    parameter_dtype: torch.dtype
    optimizer: str
    options: dict = dataclasses.field(default_factory=dict)
    match_state_of: str = ""


FRUGAL_DENSITY = 0.25
_METHOD_LIST = [
    Method("adamw", "torch.optim.AdamW, fp32 parameters (bf16 autocast on a GPU: fp32 master weights)",
           torch.float32, "adamw"),
    Method("frugal-blockwise", "FRUGAL rho=0.25, blockwise (random blocks), signSGD on the rest", torch.float32,
           "frugal", {"density": FRUGAL_DENSITY, "projection": "blockwise"}),
    Method("frugal-columns", "FRUGAL rho=0.25, random columns, signSGD on the rest", torch.float32, "frugal",
           {"density": FRUGAL_DENSITY, "projection": "columns"}),
    Method("lowrank-svd", "FRUGAL svd projection, no state-free update (GaLore-like low rank), density matched to "
           "frugal-columns' state bytes", torch.float32, "frugal", {"projection": "svd", "state_free": "none"},
           match_state_of="frugal-columns"),
    Method("signsgd", "FRUGAL rho=0: signSGD on every split matrix (AdamW on embeddings, norms, head)",
           torch.float32, "frugal", {"density": 0.0, "projection": "columns"}),
    Method("frugal-columns-project", "frugal-columns with on_switch='project' (kept moments of staying columns)",
           torch.float32, "frugal", {"density": FRUGAL_DENSITY, "projection": "columns", "on_switch": "project"}),
    Method("adamw-bf16", "torch.optim.AdamW on a bf16 model (pure bf16: no master weights)", torch.bfloat16,
           "adamw"),
    Method("collage-light", "leanops CollageAdamW mode='light' on the bf16 model", torch.bfloat16, "collage",
           {"mode": "light"}),
    Method("collage-plus", "leanops CollageAdamW mode='plus' on the bf16 model", torch.bfloat16, "collage",
           {"mode": "plus"}),
    Method("frugal-collage", "FRUGAL rho=0.25 columns, precision='collage', on the bf16 model", torch.bfloat16,
           "frugal", {"density": FRUGAL_DENSITY, "projection": "columns", "precision": "collage"}),
    # Not run by default (--methods): blockwise with kept state, and the low-rank baseline at the same rho.
    Method("frugal-blockwise-project", "frugal-blockwise with on_switch='project'", torch.float32, "frugal",
           {"density": FRUGAL_DENSITY, "projection": "blockwise", "on_switch": "project"}),
    Method("lowrank-svd-rho0.25", "FRUGAL svd rho=0.25, no state-free update (the paper's GaLore setting: more "
           "state than the others at the same rho)", torch.float32, "frugal",
           {"density": FRUGAL_DENSITY, "projection": "svd", "state_free": "none"}),
]
METHODS = {method.name: method for method in _METHOD_LIST}
DEFAULT_METHODS = ("adamw", "frugal-blockwise", "frugal-columns", "lowrank-svd", "signsgd", "frugal-columns-project",
                   "adamw-bf16", "collage-light", "collage-plus", "frugal-collage")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """What every method shares: the peak learning rate, AdamW's betas and eps, decoupled weight decay,
    FRUGAL's update_gap (steps between subspace switches), and the backend of CollageAdamW's step (every backend
    gives the reference's bits) and of FRUGAL's."""
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    update_gap: int = 200
    collage_backend: str = "auto"
    frugal_backend: str = "auto"


def _split_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(rows, columns) of each parameter FRUGAL splits in `model` (frugal_param_groups' split group)."""
    return [(parameter.shape[0], parameter.numel() // parameter.shape[0])
            for group in frugal_param_groups(model) if group["split"] for parameter in group["params"]]


def frugal_split_fraction(model: nn.Module) -> float:
    """The fraction of `model`'s parameters that ``frugal_param_groups`` splits (the block matrices)."""
    split = sum(rows * columns for rows, columns in _split_shapes(model))
    return split / sum(parameter.numel() for parameter in model.parameters())


@functools.cache
def _frugal_state_bytes_of_one(shape: tuple[int, int], device: str, dtype: torch.dtype, backend: str,
                               options: tuple) -> int:
    """FRUGAL's own ``state_bytes()`` for one split matrix of `shape` after a step (what it keeps depends on the
    backend: the kernels keep an inverse of the column indices)."""
    generator = torch.Generator().manual_seed(0)
    parameter = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
    parameter.grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    optimizer = FRUGAL([{"params": [parameter], "split": True}], **dict(options), backend=backend)
    optimizer.step()
    return optimizer.state_bytes()


def frugal_split_state_bytes(shapes: Sequence[tuple[int, int]], *, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32, backend: str = "auto", **options) -> int:
    """The optimizer-state bytes FRUGAL(`options`) keeps for split matrices of `shapes` on `device` (its own count,
    measured after one step on one stand-in matrix per distinct shape; cached): the split part of a model's state,
    whatever FRUGAL stores (moments, indices, projectors, the kernels' inverse indices)."""
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
    frozen = tuple(sorted(options.items()))
    return sum(count * _frugal_state_bytes_of_one(shape, str(torch.device(device)), dtype, backend, frozen)
               for shape, count in counts.items())


def matched_svd_density(model: nn.Module, target: Method, *, backend: str = "auto") -> float:
    """The largest density (a multiple of 1/1000) at which FRUGAL's svd projection keeps no more state on
    `model`'s split matrices than `target` (a columns method) does, both as FRUGAL counts it on the model's device:
    the low-rank baseline at equal state memory. The svd projection also stores its projector, so at the same rho
    it keeps more (the issue's 34% against 26%). The state grows with the density in steps (rank = round(density
    * side)), so a bisection over the thousandths finds it."""
    if target.options.get("projection") != "columns":
        raise ValueError(f"{PROGRAM}: matched_svd_density: argument 'target' must be a columns method, got "
                         f"{target.name!r}")
    parameter = next(model.parameters())
    shapes = _split_shapes(model)
    where = {"device": parameter.device, "dtype": parameter.dtype, "backend": backend}
    budget = frugal_split_state_bytes(shapes, **where, projection="columns", density=target.options["density"])

    def svd_bytes(thousandths: int) -> int:
        return frugal_split_state_bytes(shapes, **where, projection="svd", state_free="none",
                                        density=thousandths / 1000)

    low, high = 0, 1000  # svd_bytes(low) <= budget (no state at density 0); find the last such thousandth
    if svd_bytes(high) <= budget:
        return 1.0
    while high - low > 1:
        middle = (low + high) // 2
        if svd_bytes(middle) <= budget:
            low = middle
        else:
            high = middle
    return low / 1000


def make_optimizer(method: Method, model: nn.Module, settings: OptimizerSettings, seed: int,
                   device: torch.device) -> tuple[torch.optim.Optimizer, dict]:
    """`method`'s optimizer over `model` (already in the method's dtype) and the options it was given (for the
    JSON). FRUGAL methods split ``frugal_param_groups(model)`` and draw subspaces from `seed`; AdamW is fused on a
    GPU."""
    common_options = {"lr": settings.lr, "betas": settings.betas, "eps": settings.eps,
                      "weight_decay": settings.weight_decay}
    if method.optimizer == "adamw":
        implementation = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(model.parameters(), **common_options, **implementation), \
            {**common_options, **implementation}
    if method.optimizer == "collage":
        options = {**common_options, **method.options, "backend": settings.collage_backend}
        return CollageAdamW(model.parameters(), **options), options
    if method.optimizer == "frugal":
        options = {"update_gap": settings.update_gap, **method.options}
        if method.match_state_of:
            options["density"] = matched_svd_density(model, METHODS[method.match_state_of],
                                                     backend=settings.frugal_backend)
        optimizer = FRUGAL(frugal_param_groups(model), **common_options, **options, seed=seed,
                           backend=settings.frugal_backend)
        return optimizer, {**common_options, **options, "seed": seed, "backend": settings.frugal_backend}
    raise ValueError(f"{PROGRAM}: method {method.name!r} has an unknown optimizer kind {method.optimizer!r}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (FRUGAL and CollageAdamW count their own with
    ``state_bytes()``; for torch's AdamW, the sum over its state tensors, step counters included)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def resolve_loss_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> tuple[str, str]:
    """The linear cross-entropy backend to train with, by its concrete name, and a note ("" if none): `requested`
    when it names a backend; for "auto", the backend auto picks on this device and dtype when its loss and
    gradients on a small problem agree with the reference's (relative error within 1e-4 in float32, 2e-2 in 16
    bits), else "reference" with the reason: a backend that fails or has not been checked on this device must not
    decide the benchmark."""
    if requested != "auto":
        return requested, ""
    chosen = ops.CROSS_ENTROPY.resolve("leanops.linear_cross_entropy", "auto", device, dtype).backend
    if chosen == "reference":
        return chosen, ""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(96, 48, generator=generator).to(device, dtype)
    weight = (torch.randn(VOCABULARY, 48, generator=generator) * 0.1).to(device, dtype)
    targets = torch.randint(0, VOCABULARY, (96,), generator=generator).to(device)

    def loss_and_gradients(backend):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value = leanops.linear_cross_entropy(h, w, targets, backend=backend)
        value.backward()
        return [value.detach().float(), h.grad.float(), w.grad.float()]

    try:
        got, expected = loss_and_gradients(chosen), loss_and_gradients("reference")
    except Exception as error:  # noqa: BLE001 - any failure means: use the reference
        return "reference", (f"linear CE backend {chosen} failed on {device.type} ({type(error).__name__}: "
                             f"{error}); the reference served").splitlines()[0]
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    errors = [measurement.relative_error(value, exact) for value, exact in zip(got, expected)]
    if not all(error <= limit for error in errors):  # a NaN fails
        return "reference", (f"linear CE backend {chosen} disagrees with the reference on {device.type} (relative "
                             f"errors {', '.join(f'{error:.1e}' for error in errors)} > {limit:g}); the reference "
                             "served")
    return chosen, ""
