"""FRUGAL: AdamW state on a subspace of the gradient, a state-free update on the rest.

Zmushko et al. 2024, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training".
The gradient G of every *split* parameter (a parameter group with ``split=True``) is cut in two:

    G = G_full + R,        G_full in a low-dimensional subspace S,   R = G - G_full

- G_full gets AdamW, with the moments m, v kept only for the coordinates of S (so the state of a split parameter
  is about ``density`` times AdamW's 8 bytes per element):

      m <- beta1 m + (1 - beta1) g_S,    v <- beta2 v + (1 - beta2) g_S^2,
      theta <- theta - lr_full * back( (m / (1 - beta1^t)) / (sqrt(v) / sqrt(1 - beta2^t) + eps) )

  with lr_full = lr * state_full_lr_scale, g_S the coordinates of G in S and ``back`` the map from S back to the
  parameter's shape.
- R gets a state-free step with lr_free = lr * state_free_lr_scale:
  ``"signsgd"``: theta <- theta - lr_free * sign(R); ``"sgd"``: theta <- theta - lr_free * R; ``"none"``: nothing.
- Decoupled weight decay on the whole parameter first, as torch.optim.AdamW: theta <- theta (1 - lr * weight_decay).

Parameters of groups with ``split=False`` get plain AdamW (the same operations as torch.optim.AdamW(foreach=False),
bit for bit). A parameter is handled as the matrix ``param.view(shape[0], -1)`` (a 1-D tensor as one row).

Subspaces (``projection``), k = round(density * size) with Python's round:

- ``"blockwise"``: k = round(density * number of tensors in the group) whole tensors are state-full (AdamW on
  the whole tensor), the others fully state-free. ``block_order``: ``"random"`` (k tensors drawn without
  replacement), ``"ascending"`` / ``"descending"`` (a window of k consecutive tensors, in group order or its
  reverse, moving on by k at every switch, wrapping around).
- ``"columns"`` / ``"rows"``: k random columns / rows of each matrix (sorted, stored as int32); the moments are
  the (m x k) / (k x n) submatrices.
- ``"random"``: on the smaller side s = min(m, n), P (s x r) orthonormal, r = round(density * s), the Q of the
  QR of a seeded Gaussian. For m <= n, g_S = P^T G (r x n), back(U) = P U; for m > n, g_S = G P (m x r),
  back(U) = U P^T. G_full = back(g_S).
- ``"svd"``: as "random" with P the top-r left (m <= n) or right (m > n) singular vectors of the gradient at the
  switch step (GaLore), recomputed at every switch.

The subspaces are redrawn every ``update_gap`` steps (optimizer steps 1, 1 + update_gap, ...), from a
torch.Generator seeded with ``seed`` (never the global RNG); the draws happen in group order, parameter by parameter,
whether or not a parameter has a gradient at that step (svd excepted: it needs one), so a run is reproducible.
``on_switch`` says what happens to the moments when a subspace changes (an unchanged subspace, e.g. density=1 for
blockwise or columns, keeps its moments whatever the option):

- ``"reset"``: the moments are zeroed and the bias correction restarts (step count 0). For blockwise, the whole
  group is reset when its active set changes; tensors leaving it drop their state.
- ``"project"``: columns/rows: the moments of the coordinates that stay are kept, new coordinates start at zero,
  the step count goes on. blockwise: tensors that stay active keep their state, newly active ones start fresh.
  random/svd: with C = P_new^T P_old (r x r), m' = C m and v' = (C * C) v (C squared elementwise: an
  approximation that keeps v' >= 0; exact when C is a signed permutation), for the m > n side m' = m C^T,
  v' = v (C * C)^T; the step count goes on.

Distributed training. Every rank uses the subspace that rank 0 drew: it is broadcast at each switch (indices,
projectors, active blocks), rather than trusting that the ranks' generators agree, and at the first step every rank
takes rank 0's generator state (ranks seeded differently then draw alike, and a checkpoint's generator is rank 0's
whichever rank's copy it keeps). The group is a DTensor parameter's device-mesh group, else the default group.

- DistributedDataParallel: every rank steps the same all-reduced gradients, and the ranks stay identical.
- FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensor parameters sharded on dim 0 of a 1-D mesh, unevenly when
  dim 0 is not a multiple of the world size; Replicate DTensors work too, other layouts are refused with
  NotImplementedError): each rank steps its local shard (``param.to_local()``, ``param.grad.to_local()``), which
  holds a range of the matrix's rows (a range of the columns for a 1-D parameter), with the kernels unchanged; the
  optimizer's ``state`` holds this rank's pieces as plain tensors. The result is the single-device one:
  blockwise (whole tensors: the same active set everywhere), columns of a row-sharded matrix (the same column
  indices on every rank; moments sharded by rows) and rows (each rank keeps the moments of the subspace rows that
  fall in its range: no communication, about 1/world of the state per rank) bit for bit; random and svd to float32
  rounding: G P and back-projection are local, but for m <= n, P^T G sums over the ranks' rows, an all-reduce of
  the r x n float32 result at every step, and those moments (r x n) are replicated on every rank; svd also gathers
  the whole gradient at each switch (``full_tensor()``, an all-gather every update_gap steps), and the mesh's
  first rank computes the SVD.

``state_dict()`` carries, besides the moments, the indices / projectors and, in every parameter group, the entry
"frugal": the active blocks, the step counter and the generator state (uint8), so ``torch.load(weights_only=True)``
and ``torch.distributed.checkpoint`` (``get_state_dict`` / ``set_state_dict`` from
``torch.distributed.checkpoint.state_dict``, which keep "state" and "param_groups" only) round-trip, and a resumed
run continues bit for bit. DCP loads in place into tensors of the fresh optimizer's state dict, so the saved shapes
must not depend on the draw: blockwise groups carry zero moments (step 0) for their inactive tensors, and the rows
moments of a row-sharded matrix (or columns of a sharded 1-D parameter) travel in the parameter's matrix shape,
zeros outside the subspace: a transient of AdamW's state size for those tensors while the state dict lives.
Sharded state goes as DTensors (every rank's piece is saved), replicated state (indices, projectors, the r x n
random/svd moments) as plain tensors. A whole (plain) tensor where a DTensor piece is expected, e.g. a single-device
checkpoint or DCP's ``full_state_dict``, is cut to this rank's piece by ``load_state_dict``.
DCP's ``flatten_optimizer_state_dict`` option is not supported (it drops the "frugal" entries: load_state_dict
then refuses the state dict).
"""
import math

import torch
import torch.distributed as dist

from .. import backends
from .. import custom_ops  # noqa: F401  - registers the split-step operators
from ..reference import frugal as split_step
from ..reference import mcf as reference_mcf
from . import _distributed

Tensor = torch.Tensor

OPERATION = "leanops.optim.FRUGAL"
PROJECTIONS = ("blockwise", "columns", "rows", "random", "svd")
BLOCK_ORDERS = ("random", "ascending", "descending")
STATE_FREE = ("signsgd", "sgd", "none")
ON_SWITCH = ("reset", "project")
PRECISIONS = ("fp32", "collage")
COMPENSATED_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLEMENTED_BACKENDS = ("reference", "triton") + backends.compiled_backends_with("frugal_split_step_")
# The step is elementwise and memory-bound: the CUDA kernel first on a GPU, as for CollageAdamW.
PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
HEAD_NAMES = ("lm_head", "head", "output")
GROUP_OPTIONS = ("lr", "betas", "eps", "weight_decay", "density", "update_gap", "projection", "block_order",
                 "state_free", "state_free_lr_scale", "state_full_lr_scale", "on_switch", "split")


def _check_number(name, value, *, low=0.0, high=math.inf, where=""):
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high):
        bounds = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ValueError(f"{OPERATION}: argument '{name}'{where} must be a finite number {bounds}, got {value!r}")


def _check_choice(name, value, choices, where=""):
    if value not in choices:
        raise ValueError(f"{OPERATION}: argument '{name}'{where} must be one of {choices}, got {value!r}")


def _check_group(group: dict, where: str = "") -> None:
    for name in ("lr", "eps", "weight_decay", "state_free_lr_scale", "state_full_lr_scale"):
        _check_number(name, group[name], where=where)
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"{OPERATION}: argument 'betas'{where} must be two numbers in [0, 1), got {betas!r}")
    _check_number("density", group["density"], high=1.0, where=where)
    gap = group["update_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"{OPERATION}: argument 'update_gap'{where} must be an integer >= 1, got {gap!r}")
    _check_choice("projection", group["projection"], PROJECTIONS, where)
    _check_choice("block_order", group["block_order"], BLOCK_ORDERS, where)
    _check_choice("state_free", group["state_free"], STATE_FREE, where)
    _check_choice("on_switch", group["on_switch"], ON_SWITCH, where)
    if not isinstance(group["split"], bool):
        raise ValueError(f"{OPERATION}: argument 'split'{where} must be a bool, got {group['split']!r}")


def _check_precision_and_backend(precision, backend) -> None:
    _check_choice("precision", precision, PRECISIONS)
    if not isinstance(backend, str):
        raise TypeError(f"{OPERATION}: argument 'backend' must be a string, got {type(backend).__name__}")
    if backend != backends.AUTO and backend not in backends.BACKENDS:
        raise ValueError(f"{OPERATION}: argument 'backend' must be one of {(backends.AUTO,) + backends.BACKENDS}, "
                         f"got {backend!r}")


def _resolve_backend(backend: str, parameter: Tensor) -> str:
    """The backend that steps `parameter` (BackendUnavailableError if the named one cannot)."""
    return backends.resolve(OPERATION, backend, parameter.device, parameter.dtype, kernel_dtypes=KERNEL_DTYPES,
                            preference=PREFERENCE, implemented=IMPLEMENTED_BACKENDS)


def _matrix_shape(parameter: Tensor) -> tuple[int, int]:
    """The (global) matrix view of a parameter: ``view(shape[0], -1)``, a 1-D tensor as one row."""
    return _distributed.matrix_shape(parameter.shape)


def _subspace_size(density: float, size: int) -> int:
    return min(size, max(0, round(density * size)))


def _from_rank_zero(drawn: Tensor, group=None) -> Tensor:
    """Under torch.distributed, every rank of `group` (a DTensor parameter's device-mesh group; None: the default
    group) takes the subspace the group's first rank drew (broadcast): ranks must agree on it, and a shared seed is not
    trusted to ensure that (a rank may have been seeded differently, or an svd may differ in its last bits). Without
    a process group of more than one rank, `drawn` itself. NCCL moves CUDA tensors only."""
    return _distributed.broadcast_from_first(drawn, group)


def _localize(indices: Tensor, span: tuple[int, int] | None) -> Tensor:
    """The subspace indices that fall in this rank's range `span` of a sharded dimension, relative to its start
    (all of them when the dimension is whole)."""
    if span is None:
        return indices
    start, stop = span
    return indices[(indices >= start) & (indices < stop)] - start


SUBSPACE_DIM = {"columns": 1, "rows": 0}
MOMENTS = ("exp_avg", "exp_avg_sq")
# A state entry that is an extra of the state dict only: FRUGAL's generator, step counter and active blocks travel
# in every parameter group (torch.distributed.checkpoint keeps "state" and "param_groups" only).
EXTRA_KEY = "frugal"


class FRUGAL(torch.optim.Optimizer):
    """AdamW on a gradient subspace (``density`` of the coordinates) plus a state-free step on the rest.

    Args:
        params: parameters or parameter groups. Group option ``split`` (default True) says whether a group's
            parameters are split; ``frugal_param_groups(model)`` gives the usual choice. Every option below except
            precision, seed and backend can be set per group. Parameters may be DTensors: FSDP2's ``fully_shard``
            (Shard(0) on a 1-D device mesh), or Replicate (module docstring, "Distributed training").
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay on the whole parameter).
        density: fraction in [0, 1] of each split parameter (or, blockwise, of the group's tensors) that is
            state-full.
        update_gap: steps between subspace switches (>= 1).
        projection: "blockwise", "columns", "rows", "random" or "svd" (module docstring).
        block_order: "random", "ascending" or "descending" (blockwise only).
        state_free: "signsgd", "sgd" or "none": the update of the state-free remainder.
        state_free_lr_scale, state_full_lr_scale: multiply lr for the state-free / state-full (AdamW) parts.
        on_switch: "reset" or "project": what the moments do when a subspace changes (module docstring).
        precision: "fp32" (moments and arithmetic in float32; a 16-bit parameter is rounded after each step), or
            "collage": moments and arithmetic in float32, and each bfloat16/float16 parameter is the pair
            (theta, theta_lo) of Collage's multi-component floats, the step's change going in with Grow, so that
            updates below theta's half-ulp accumulate (float32 parameters are updated as with "fp32").
        seed: seed of the generator the subspaces are drawn from (under torch.distributed, rank 0's counts).
        backend: "auto", "reference", "triton", "cuda" or "cpu" (leanops.backends). "reference" is the plain-PyTorch
            step above (bit for bit torch.optim.AdamW's operations on the state-full part); the others are the fused
            split-step kernels (leanops.reference.frugal states their per-element math), equal to the reference up
            to float32 rounding. "auto": the C++ kernel on the CPU, CUDA then Triton on a GPU, the reference for
            float64 parameters.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, density: float = 0.25, update_gap: int = 200,
                 projection: str = "blockwise", block_order: str = "random", state_free: str = "signsgd",
                 state_free_lr_scale: float = 1.0, state_full_lr_scale: float = 1.0, on_switch: str = "reset",
                 precision: str = "fp32", seed: int = 0, backend: str = "auto"):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, density=density, update_gap=update_gap, projection=projection,
                        block_order=block_order, state_free=state_free, state_free_lr_scale=state_free_lr_scale,
                        state_full_lr_scale=state_full_lr_scale, on_switch=on_switch, split=True)
        _check_group(defaults)
        _check_precision_and_backend(precision, backend)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{OPERATION}: argument 'seed' must be an integer, got {seed!r}")
        super().__init__(params, defaults)
        for group_index, group in enumerate(self.param_groups):
            _check_group(group, where=f" (parameter group {group_index})")
            for parameter_index, parameter in enumerate(group["params"]):
                if not parameter.is_floating_point():
                    raise ValueError(f"{OPERATION}: parameter {parameter_index} of group {group_index} has dtype "
                                     f"{parameter.dtype}; FRUGAL updates floating-point parameters")
                _resolve_backend(backend, parameter)  # a backend that cannot serve is refused before any step
                self._layout(parameter)  # so is a DTensor layout that is not supported
        self.precision = precision
        self.seed = seed
        self.backend = backend
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._steps_taken = 0
        self._active_blocks: dict[int, Tensor] = {}
        # The kernels' inverse of each parameter's int32 indices (-1 outside the subspace), rebuilt when the
        # indices change: parameter -> (indices, positions).
        self._positions: dict[Tensor, tuple[Tensor, Tensor]] = {}

    # -----------------------------------------------------------------------------------------------------------
    # Distributed layout.

    @staticmethod
    def _layout(parameter: Tensor) -> _distributed.Layout:
        return _distributed.Layout(parameter, OPERATION)

    def _process_group(self):
        """The group whose ranks share the active blocks and the generator: the first DTensor parameter's mesh
        group, else the default group (None)."""
        for group in self.param_groups:
            for parameter in group["params"]:
                if _distributed.is_dtensor(parameter):
                    return self._layout(parameter).group
        return None

    # -----------------------------------------------------------------------------------------------------------
    # State.

    def state_bytes(self) -> int:
        """Bytes of per-parameter optimizer state held by this rank (moments, int32 indices, projectors, Collage
        compensations, and the kernels' int32 inverse of the indices: one entry per column or row), excluding the
        parameters and the constant-size generator state."""
        state = sum(value.numel() * value.element_size() for state in self.state.values()
                    for value in state.values() if isinstance(value, Tensor))
        return state + sum(positions.numel() * positions.element_size() for _, positions in self._positions.values())

    def _moment_layout(self, group: dict, layout: _distributed.Layout, state: dict) -> tuple:
        """How a parameter's moments are held: ("whole",) for AdamW on the whole tensor (the parameter's shape);
        ("subspace", dim, k) for columns/rows (dim the subspace's matrix dimension, k its global size);
        ("projected", left, r) for random/svd."""
        projection = group["projection"]
        if not group["split"] or projection == "blockwise":
            return ("whole",)
        if projection in SUBSPACE_DIM:
            return ("subspace", SUBSPACE_DIM[projection], state["indices"].numel())
        return ("projected", layout.rows <= layout.columns, state["projector"].shape[1])

    def _pack(self, group: dict, parameter: Tensor, layout: _distributed.Layout, state: dict) -> dict:
        """A parameter's state as the state dict carries it. For a DTensor parameter, what is sharded becomes a
        DTensor (torch.distributed.checkpoint saves every rank's piece), what is replicated stays a plain tensor
        (one copy is saved). Columns/rows moments along the sharded dimension (rows of a Shard(0) matrix) differ in
        size from rank to rank with the draw: they are carried in the parameter's matrix shape, zeros outside the
        subspace, so that the saved shapes do not depend on the draw."""
        packed = dict(state)
        if not layout.sharded and layout.mesh is None:
            return packed
        parameter_shape = tuple(parameter.shape)
        if "param_lo" in state:
            packed["param_lo"] = layout.wrap(state["param_lo"], 0, parameter_shape)
        if "exp_avg" not in state:
            return packed
        kind = self._moment_layout(group, layout, state)
        for key in MOMENTS:
            value = state[key]
            if kind[0] == "whole":
                packed[key] = layout.wrap(value, 0, parameter_shape)
            elif kind[0] == "subspace":
                _, dim, count = kind
                if layout.axis == dim:
                    local_rows, local_columns = layout.local_shape
                    expanded = value.new_zeros(local_rows, local_columns)
                    span = layout.local_range(dim)
                    expanded.index_copy_(dim, _localize(state["indices"], span).long(), value)
                    packed[key] = layout.wrap(expanded, dim, (layout.rows, layout.columns))
                else:
                    shape = (layout.rows, count) if dim == 1 else (count, layout.columns)
                    packed[key] = layout.wrap(value, layout.axis, shape)
            else:
                _, left, rank = kind
                shape = (rank, layout.columns) if left else (layout.rows, rank)
                sharded_dim = 1 if left else 0
                if layout.axis == sharded_dim or (layout.axis is None and layout.mesh is not None):
                    packed[key] = layout.wrap(value, sharded_dim, shape)
                # else: the contraction runs over the sharded dimension: the moments are replicated, plain.
        return packed

    def _unpack(self, group: dict, parameter: Tensor, layout: _distributed.Layout, saved: dict) -> dict:
        """The inverse of _pack: this rank's pieces, as plain tensors on the parameter's device. A plain tensor where
        a DTensor piece is expected is a whole one (e.g. from a single-device checkpoint): it is cut to this rank's
        piece."""
        device = layout.tensor.device
        state, whole = {}, {}
        for key, value in saved.items():
            if isinstance(value, Tensor):
                whole[key] = not _distributed.is_dtensor(value)
                value = _distributed.local(value).to(device=device).clone()
            state[key] = value
        if not layout.sharded:
            if "exp_avg" in state and group["split"] and group["projection"] in SUBSPACE_DIM:
                # The matrix-shaped form of a sharded run's columns/rows moments, gathered (a full state dict).
                dim, indices = SUBSPACE_DIM[group["projection"]], state["indices"]
                for key in MOMENTS:
                    if state[key].shape[dim] != indices.numel():
                        state[key] = state[key].index_select(dim, indices.long()).contiguous()
            return state
        if whole.get("param_lo"):
            state["param_lo"] = layout.narrow(state["param_lo"], 0).contiguous()
        if "exp_avg" not in state:
            return state
        kind = self._moment_layout(group, layout, state)
        for key in MOMENTS:
            value, is_whole = state[key], whole[key]
            if kind[0] == "whole":
                if is_whole:
                    value = layout.narrow(value, 0)
            elif kind[0] == "subspace":
                _, dim, count = kind
                span = layout.local_range(dim)
                if layout.axis == dim:
                    indices = state["indices"]
                    if is_whole and value.shape[dim] == count:  # the compact moments of the whole subspace
                        value = value.index_select(dim, ((indices >= span[0]) & (indices < span[1])).nonzero()
                                                   .flatten())
                    else:  # the matrix-shaped form of _pack (whole, or this rank's rows)
                        if is_whole:
                            value = layout.narrow(value, dim)
                        value = value.index_select(dim, _localize(indices, span).long())
                elif is_whole:
                    value = layout.narrow(value, layout.axis)
            else:
                _, left, _ = kind
                sharded_dim = 1 if left else 0
                if is_whole and layout.axis == sharded_dim:
                    value = layout.narrow(value, sharded_dim)
            state[key] = value.contiguous()
        return state

    def state_dict(self) -> dict:
        """The state as torch.optim.Optimizer's, plus, in every parameter group, the entry "frugal": the generator
        state (uint8), the optimizer steps taken and the group's active blocks (blockwise; else None), kept there so
        that torch.distributed.checkpoint (which keeps "state" and "param_groups" only) carries them. In blockwise
        groups every tensor has moments (zeros, step 0, for the inactive ones: DCP loads in place into tensors whose
        shapes must not depend on the draw), a transient of AdamW's state size for those tensors."""
        state = super().state_dict()
        generator = self._generator.get_state()
        packed = {}
        for group_index, (saved_group, group) in enumerate(zip(state["param_groups"], self.param_groups)):
            blockwise = group["split"] and group["projection"] == "blockwise"
            active = self._active_blocks.get(group_index) if blockwise else None
            for position, (saved_id, parameter) in enumerate(zip(saved_group["params"], group["params"])):
                entry = self.state.get(parameter)
                layout = self._layout(parameter)
                if active is not None and position not in set(active.tolist()):
                    entry = dict(entry or {})
                    entry["step"] = 0
                    for key in MOMENTS:
                        entry[key] = torch.zeros(layout.tensor.shape, dtype=torch.float32,
                                                 device=layout.tensor.device)
                if entry:
                    packed[saved_id] = self._pack(group, parameter, layout, entry)
            saved_group[EXTRA_KEY] = {
                "steps_taken": self._steps_taken,
                "generator": generator.clone(),
                "active_blocks": active.tolist() if active is not None else None,
            }
        state["state"] = packed
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        extras = [saved.get(EXTRA_KEY) for saved in saved_groups]
        legacy = state_dict.get(EXTRA_KEY)  # the top-level entry of earlier versions
        first = legacy if legacy is not None else next((extra for extra in extras if extra is not None), None)
        if first is None:
            raise ValueError(f"{OPERATION}.load_state_dict: argument 'state_dict' lacks the 'frugal' entries "
                             f"(not a FRUGAL state dict)")
        # The base class would cast every state tensor to its parameter's dtype (int32 indices included): load the
        # groups through it and install the state here, keeping each tensor's dtype.
        super().load_state_dict({"state": {}, "param_groups": [
            {key: value for key, value in saved.items() if key != EXTRA_KEY} for saved in saved_groups]})
        for group_index, group in enumerate(self.param_groups):
            _check_group(group, where=f" (parameter group {group_index})")
        active_blocks = {}
        for group_index, extra in enumerate(extras):
            if extra is not None and extra.get("active_blocks") is not None:
                active_blocks[group_index] = torch.tensor(list(extra["active_blocks"]), dtype=torch.int32)
        if legacy is not None:
            active_blocks = {int(index): blocks.clone() for index, blocks in legacy["active_blocks"].items()}
        where = {saved_id: (group, position, parameter)
                 for saved, group in zip(saved_groups, self.param_groups)
                 for position, (saved_id, parameter) in enumerate(zip(saved["params"], group["params"]))}
        group_index_of = {id(group): index for index, group in enumerate(self.param_groups)}
        self.state.clear()
        self._positions.clear()
        for saved_id, saved_state in state_dict["state"].items():
            group, position, parameter = where[saved_id]
            state = self._unpack(group, parameter, self._layout(parameter), saved_state)
            blocks = active_blocks.get(group_index_of[id(group)])
            if group["split"] and group["projection"] == "blockwise" and (
                    blocks is None or position not in set(blocks.tolist())):
                # An inactive block: moments (zeros in the state dict) are dropped, the compensation stays.
                for key in ("step",) + MOMENTS:
                    state.pop(key, None)
            if state:
                self.state[parameter] = state
        self._steps_taken = int(first["steps_taken"])
        self._generator.set_state(_distributed.local(first["generator"]).to("cpu", torch.uint8).clone())
        self._active_blocks = active_blocks

    # -----------------------------------------------------------------------------------------------------------
    # Subspaces.

    def _draw_blocks(self, group_index: int, group: dict) -> None:
        count = len(group["params"])
        active = _subspace_size(group["density"], count)
        order = group["block_order"]
        if order == "random":
            chosen = torch.randperm(count, generator=self._generator)[:active].tolist()
        else:
            start = (self._steps_taken // group["update_gap"]) * active
            chosen = [(start + j) % count for j in range(active)] if count else []
            if order == "descending":
                chosen = [count - 1 - position for position in chosen]
        new = _from_rank_zero(torch.tensor(sorted(chosen), dtype=torch.int32), self._process_group())
        chosen = new.tolist()
        old = self._active_blocks.get(group_index)
        self._active_blocks[group_index] = new
        if old is not None and torch.equal(old, new):
            return
        stay = set(old.tolist()) & set(chosen) if old is not None and group["on_switch"] == "project" else set()
        for position, parameter in enumerate(group["params"]):
            if position not in stay:
                self._forget_moments(parameter)

    def _draw_subspace(self, group: dict, parameter: Tensor) -> None:
        """A new subspace for one parameter of a columns/rows/random/svd group, moving its moments (on_switch)."""
        projection = group["projection"]
        layout = self._layout(parameter)
        rows, columns = layout.rows, layout.columns
        device = layout.tensor.device
        state = self.state[parameter]
        project = group["on_switch"] == "project"
        if projection in SUBSPACE_DIM:
            dim = SUBSPACE_DIM[projection]
            size = columns if projection == "columns" else rows
            count = _subspace_size(group["density"], size)
            new = torch.randperm(size, generator=self._generator)[:count].sort().values.to(torch.int32)
            new = _from_rank_zero(new.to(device), layout.group)
            old = state.get("indices")
            state["indices"] = new
            span = layout.local_range(dim)
            new_local = _localize(new, span)
            if old is None or torch.equal(old, new):
                if old is None:
                    self._fresh_moments(state, layout, projection, new_local.numel())
                return
            if not project:
                self._fresh_moments(state, layout, projection, new_local.numel())
                return
            # Position of each new index among the old ones, -1 for a coordinate that is new (this rank's range of
            # a sharded dimension: its moments are those of the subspace coordinates in it).
            old_local = _localize(old, span)
            where_old = torch.full((layout.local_shape[dim],), -1, dtype=torch.long, device=device)
            where_old[old_local.long()] = torch.arange(old_local.numel(), device=device)
            source = where_old[new_local.long()]
            keep = source >= 0
            for key in MOMENTS:
                shape = list(state[key].shape)
                shape[dim] = new_local.numel()
                moved = state[key].new_zeros(shape)
                kept = state[key].index_select(dim, source[keep])
                moved.index_copy_(dim, keep.nonzero().flatten(), kept)
                state[key] = moved
            return
        # random / svd: P on the smaller side (of the whole matrix), replicated.
        side = min(rows, columns)
        rank = _subspace_size(group["density"], side)
        if projection == "random":
            gaussian = torch.randn(side, rank, generator=self._generator, dtype=torch.float32)
            new = torch.linalg.qr(gaussian).Q if rank else gaussian
            new = new.to(device).contiguous()
        else:
            if parameter.grad is None:
                return  # drawn when a gradient is there (see step)
            gradient = parameter.grad
            if _distributed.is_dtensor(gradient):
                # The whole gradient (an all-gather at each switch); only the first rank's singular vectors count.
                gradient = gradient.full_tensor()
            gradient = gradient.reshape(rows, columns).to(torch.float32)
            if rank == 0:
                new = gradient.new_zeros(side, 0)
            elif layout.mesh is not None and _distributed.distributed(layout.group) and dist.get_rank(
                    layout.group) != 0:
                new = gradient.new_zeros(side, rank)  # receives the first rank's
            else:
                left, _, right_t = torch.linalg.svd(gradient, full_matrices=False)
                new = (left[:, :rank] if rows <= columns else right_t[:rank].T).contiguous()
        new = _from_rank_zero(new, layout.group)
        old = state.get("projector")
        state["projector"] = new
        if old is None or not project:
            self._fresh_moments(state, layout, projection, rank)
            return
        mixing = new.T @ old  # C = P_new^T P_old, r x r
        if rows <= columns:
            state["exp_avg"] = mixing @ state["exp_avg"]
            state["exp_avg_sq"] = (mixing * mixing) @ state["exp_avg_sq"]
        else:
            state["exp_avg"] = state["exp_avg"] @ mixing.T
            state["exp_avg_sq"] = state["exp_avg_sq"] @ (mixing * mixing).T

    def _forget_moments(self, parameter: Tensor) -> None:
        """Drop a parameter's moments (a block leaving the active set); its Collage compensation stays."""
        state = self.state.get(parameter)
        if state is None:
            return
        for key in [key for key in state if key != "param_lo"]:
            del state[key]
        if not state:
            del self.state[parameter]

    @staticmethod
    def _fresh_moments(state: dict, layout: _distributed.Layout, projection: str, count: int) -> None:
        """Zero moments of this rank's shape: `count` is the subspace size on this rank (columns/rows) or the rank r
        of the projector (random/svd)."""
        local_rows, local_columns = layout.local_shape
        if projection == "columns":
            shape = (local_rows, count)
        elif projection == "rows":
            shape = (count, local_columns)
        else:  # random / svd, on the smaller side of the whole matrix
            shape = (count, local_columns) if layout.rows <= layout.columns else (local_rows, count)
        state["step"] = 0
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=layout.tensor.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=layout.tensor.device)

    @staticmethod
    def _project(layout: _distributed.Layout, projector: Tensor, matrix: Tensor, left: bool) -> tuple[Tensor, Tensor]:
        """(this rank's rows of the projector, the projected gradient): P^T G (left) or G P. For a matrix sharded
        by rows, P^T G sums over the ranks' rows: an all-reduce of the r x n result over the mesh."""
        if not left:
            return projector, matrix @ projector
        basis = layout.narrow(projector, 0) if layout.axis == 0 else projector
        small = basis.T @ matrix
        if layout.axis == 0:
            _distributed.all_reduce_sum(small, layout.group)
        return basis, small

    # -----------------------------------------------------------------------------------------------------------
    # The step.

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._steps_taken == 0:
            # Every rank draws with the first rank's generator: the draws are broadcast anyway, and the saved
            # generator state is then the same whichever rank's copy a checkpoint keeps.
            self._generator.set_state(_from_rank_zero(self._generator.get_state(), self._process_group()))
        for group_index, group in enumerate(self.param_groups):
            for parameter in group["params"]:
                if parameter.grad is not None and parameter.grad.is_sparse:
                    raise ValueError(f"{OPERATION}: sparse gradients are not supported")
            switching = self._steps_taken % group["update_gap"] == 0
            if group["split"]:
                if group["projection"] == "blockwise":
                    if switching or group_index not in self._active_blocks:
                        self._draw_blocks(group_index, group)
                else:
                    for parameter in group["params"]:
                        missing = "indices" not in self.state[parameter] and "projector" not in self.state[parameter]
                        if switching or (missing and parameter.grad is not None):
                            self._draw_subspace(group, parameter)
            active = (set(self._active_blocks[group_index].tolist())
                      if group["split"] and group["projection"] == "blockwise" else None)
            fused: dict[tuple, list[tuple[int, Tensor]]] = {}
            for position, parameter in enumerate(group["params"]):
                if parameter.grad is None:
                    continue
                chosen = _resolve_backend(self.backend, parameter)
                if chosen == "reference":
                    self._reference_step(group, position, parameter, active)
                else:
                    fused.setdefault((chosen, parameter.device, parameter.dtype), []).append((position, parameter))
            for (chosen, _, _), entries in fused.items():
                self._fused_step(group, entries, active, chosen)
        self._steps_taken += 1
        return loss

    def _reference_step(self, group: dict, position: int, parameter: Tensor, active: set | None) -> None:
        """One parameter's step in plain PyTorch (the module docstring's operations, in torch.optim.AdamW's order),
        on this rank's piece of it."""
        layout = self._layout(parameter)
        theta = layout.tensor
        compensated = self.precision == "collage" and theta.dtype in COMPENSATED_DTYPES
        if compensated:
            low = self._compensation(parameter)
            before = theta.detach().to(torch.float32) + low.to(torch.float32)  # exact: a 16-bit pair
            work = before.clone(memory_format=torch.contiguous_format)
        elif theta.dtype == torch.float32 and theta.is_contiguous():
            work = theta
        else:
            work = theta.detach().to(torch.float32, memory_format=torch.contiguous_format)
        gradient = _distributed.local(parameter.grad).to(torch.float32, memory_format=torch.contiguous_format)
        if group["weight_decay"] != 0:
            work.mul_(1 - group["lr"] * group["weight_decay"])
        if not group["split"] or (active is not None and position in active):
            self._adamw(group, parameter, work, gradient)
        elif active is not None:
            self._state_free(group, work, gradient)
        else:
            self._split_update(group, parameter, layout, work, gradient)
        if compensated:
            # The step's change (exact: work and before are within a factor 2) goes into the pair by Grow.
            high, low_part = reference_mcf.grow(theta.detach(), low, (work - before).to(theta.dtype))
            theta.copy_(high)
            low.copy_(low_part)
        elif work is not theta:
            theta.copy_(work)

    def _compensation(self, parameter: Tensor) -> Tensor:
        """The Collage compensation theta_lo of (this rank's piece of) a 16-bit parameter (zeros at first)."""
        return self.state[parameter].setdefault("param_lo", torch.zeros_like(
            _distributed.local(parameter), memory_format=torch.contiguous_format))

    def _positions_of(self, parameter: Tensor, layout: _distributed.Layout, dim: int) -> Tensor:
        """int32: the position of each of this rank's columns (dim 1) or rows (dim 0) in its part of the subspace,
        -1 outside."""
        indices = self.state[parameter]["indices"]
        cached = self._positions.get(parameter)
        if cached is not None and cached[0] is indices:
            return cached[1]
        local_indices = _localize(indices, layout.local_range(dim)).long()
        device = layout.tensor.device
        positions = torch.full((layout.local_shape[dim],), -1, dtype=torch.int32, device=device)
        positions[local_indices] = torch.arange(local_indices.numel(), dtype=torch.int32, device=device)
        self._positions[parameter] = (indices, positions)
        return positions

    def _advance(self, group: dict, state: dict) -> tuple[float, float]:
        """Count a state-full step; return its (step_size, bias_correction2_root), in float64 as the reference's."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        return (group["lr"] * group["state_full_lr_scale"] / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5)

    def _fused_step(self, group: dict, entries: list[tuple[int, Tensor]], active: set | None, backend: str) -> None:
        """The step of a group's parameters of one device and dtype in one fused kernel call (two, plus matmuls, for
        random/svd projections: leanops.reference.frugal's module docstring), on this rank's pieces."""
        operator = getattr(torch.ops, backends.operator_namespace(backend)).frugal_split_step_
        device = entries[0][1].device
        compensated = self.precision == "collage" and entries[0][1].dtype in COMPENSATED_DTYPES
        no_tensor = torch.empty(0, device=device)
        call = {key: [] for key in ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "grads", "positions",
                                    "addends", "modes", "step_sizes", "roots")}
        projected = {key: [] for key in ("scratch", "exp_avgs", "exp_avg_sqs", "grads", "step_sizes", "roots")}
        projected_entries = []
        copies_back = []
        for position, parameter in entries:
            state = self.state[parameter]
            layout = self._layout(parameter)
            theta = layout.tensor
            target = theta
            if not theta.is_contiguous():
                target = theta.detach().contiguous()
                copies_back.append((theta, target))
            gradient = _distributed.local(parameter.grad)
            if gradient.dtype not in (theta.dtype, torch.float32):
                gradient = gradient.to(torch.float32)
            gradient = gradient.contiguous()
            moments, indices, addend = (no_tensor, no_tensor), no_tensor, no_tensor
            step_size, root = 0.0, 1.0
            if not group["split"] or (active is not None and position in active):
                mode = split_step.ADAMW
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(theta.shape, dtype=torch.float32, device=device)
                    state["exp_avg_sq"] = torch.zeros(theta.shape, dtype=torch.float32, device=device)
                moments = (state["exp_avg"], state["exp_avg_sq"])
                step_size, root = self._advance(group, state)
            elif active is not None:
                mode = split_step.FREE
            elif group["projection"] in SUBSPACE_DIM:
                mode = split_step.COLUMNS if group["projection"] == "columns" else split_step.ROWS
                indices = self._positions_of(parameter, layout, SUBSPACE_DIM[group["projection"]])
                moments = (state["exp_avg"], state["exp_avg_sq"])
                if state["indices"].numel():
                    step_size, root = self._advance(group, state)
            else:  # random / svd: AdamW on P^T G (or G P) first, in `projected`
                mode = split_step.FREE
                projector = state["projector"]
                if projector.shape[1]:
                    matrix = gradient.to(torch.float32).view(layout.local_shape)
                    left = layout.rows <= layout.columns
                    basis, small = self._project(layout, projector, matrix, left)
                    size, root_size = self._advance(group, state)
                    projected_entries.append((len(call["params"]), matrix, basis, left, small))
                    projected["scratch"].append(torch.zeros_like(small))
                    projected["exp_avgs"].append(state["exp_avg"])
                    projected["exp_avg_sqs"].append(state["exp_avg_sq"])
                    projected["grads"].append(small)
                    projected["step_sizes"].append(size)
                    projected["roots"].append(root_size)
            call["params"].append(target)
            if compensated:
                call["params_lo"].append(self._compensation(parameter))
            call["exp_avgs"].append(moments[0])
            call["exp_avg_sqs"].append(moments[1])
            call["grads"].append(gradient)
            call["positions"].append(indices)
            call["addends"].append(addend)
            call["modes"].append(mode)
            call["step_sizes"].append(step_size)
            call["roots"].append(root)
        beta1, beta2 = group["betas"]
        if projected_entries:
            # AdamW in the subspace: each scratch becomes -step_size * m / denom; then back up with the projector.
            kept = [index for index, small in enumerate(projected["grads"]) if small.numel()]
            if kept:
                chosen = {key: [values[index] for index in kept] for key, values in projected.items()}
                count = len(kept)
                operator(chosen["scratch"], [], chosen["exp_avgs"], chosen["exp_avg_sqs"], chosen["grads"],
                         [no_tensor] * count, [no_tensor] * count, [split_step.ADAMW] * count, chosen["step_sizes"],
                         chosen["roots"], float(beta1), float(beta2), float(group["eps"]), 1.0, 0.0,
                         split_step.NONE)
            for (index, matrix, basis, left, small), update in zip(projected_entries, projected["scratch"]):
                call["addends"][index] = (basis @ update if left else update @ basis.T).contiguous()
                call["grads"][index] = matrix - (basis @ small if left else small @ basis.T)
            # One gradient dtype per call: the remainders are float32, so every gradient goes as float32 (exact).
            call["grads"] = [gradient.to(torch.float32) for gradient in call["grads"]]
        # An empty shard (FSDP2's last ranks when dim 0 is short) has nothing to update.
        kept = [index for index, target in enumerate(call["params"]) if target.numel()]
        if kept:
            call = {key: (values if key == "params_lo" and not compensated else [values[index] for index in kept])
                    for key, values in call.items()}
            operator(call["params"], call["params_lo"], call["exp_avgs"], call["exp_avg_sqs"], call["grads"],
                     call["positions"], call["addends"], call["modes"], call["step_sizes"], call["roots"],
                     float(beta1), float(beta2), float(group["eps"]), 1 - group["lr"] * group["weight_decay"],
                     group["lr"] * group["state_free_lr_scale"], split_step.STATE_FREE_CODES[group["state_free"]])
        for theta, target in copies_back:
            theta.copy_(target)

    def _moments_step(self, group: dict, state: dict, gradient: Tensor) -> tuple[float, Tensor]:
        """Advance m, v with the subspace gradient; return (step_size, denom) as torch.optim.AdamW computes them."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(gradient, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = group["lr"] * group["state_full_lr_scale"] / bias_correction1
        denom = (state["exp_avg_sq"].sqrt() / bias_correction2 ** 0.5).add_(group["eps"])
        return step_size, denom

    def _adamw(self, group: dict, parameter: Tensor, work: Tensor, gradient: Tensor) -> None:
        """Plain AdamW on the whole tensor (not split, or an active block)."""
        state = self.state[parameter]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(work)
            state["exp_avg_sq"] = torch.zeros_like(work)
        step_size, denom = self._moments_step(group, state, gradient)
        work.addcdiv_(state["exp_avg"], denom, value=-step_size)

    @staticmethod
    def _state_free(group: dict, work: Tensor, remainder: Tensor) -> None:
        rule = group["state_free"]
        rate = group["lr"] * group["state_free_lr_scale"]
        if rule == "signsgd":
            work.add_(remainder.sign(), alpha=-rate)
        elif rule == "sgd":
            work.add_(remainder, alpha=-rate)

    def _split_update(self, group: dict, parameter: Tensor, layout: _distributed.Layout, work: Tensor,
                      gradient: Tensor) -> None:
        state = self.state[parameter]
        local_rows, local_columns = layout.local_shape
        matrix = work.view(local_rows, local_columns)
        gradient = gradient.view(local_rows, local_columns)
        if group["projection"] in SUBSPACE_DIM:
            dim = SUBSPACE_DIM[group["projection"]]
            indices = _localize(state["indices"], layout.local_range(dim)).long()
            if state["indices"].numel():
                # Gather, update with exactly AdamW's operations, scatter back: the subspace coordinates get the
                # bits AdamW on the submatrix would give. (A rank whose range holds none of a sharded dimension's
                # subspace still counts the step: the step count is the subspace's.)
                sub = matrix.index_select(dim, indices)
                step_size, denom = self._moments_step(group, state, gradient.index_select(dim, indices))
                sub.addcdiv_(state["exp_avg"], denom, value=-step_size)
                matrix.index_copy_(dim, indices, sub)
            if group["state_free"] != "none" and indices.numel() < matrix.shape[dim]:
                self._state_free(group, matrix, gradient.clone().index_fill_(dim, indices, 0))
            return
        projector = state["projector"]
        left = layout.rows <= layout.columns
        if projector.shape[1]:
            basis, projected = self._project(layout, projector, gradient, left)
            step_size, denom = self._moments_step(group, state, projected)
            direction = state["exp_avg"] / denom
            matrix.add_(basis @ direction if left else direction @ basis.T, alpha=-step_size)
            remainder = gradient - (basis @ projected if left else projected @ basis.T)
        else:
            remainder = gradient
        self._state_free(group, matrix, remainder)


def frugal_param_groups(model: torch.nn.Module) -> list[dict]:
    """The usual FRUGAL split of a model: [{"params": ..., "split": True}, {"params": ..., "split": False}].

    The 2-D weights of nn.Linear layers are split. Everything else stays fully AdamW: embeddings, norms, biases,
    and the output head, i.e. a Linear whose weight is an embedding's (tied), and the last Linear whose own name
    is lm_head, head or output. Empty groups are left out; add any option to a group to override it there.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"leanops.optim.frugal_param_groups: argument 'model' must be a torch.nn.Module, "
                        f"got {type(model).__name__}")
    embedding_weights = {id(module.weight) for module in model.modules()
                         if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))}
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    heads = [module for name, module in linears if name.rsplit(".", 1)[-1] in HEAD_NAMES]
    head = heads[-1] if heads else None
    split_ids = {id(module.weight) for _, module in linears
                 if module is not head and module.weight.dim() == 2 and id(module.weight) not in embedding_weights}
    split, full, seen = [], [], set()
    for parameter in model.parameters():  # deduplicated (tied weights appear once)
        if id(parameter) in seen or not parameter.requires_grad:
            continue
        seen.add(id(parameter))
        (split if id(parameter) in split_ids else full).append(parameter)
    groups = []
    if split:
        groups.append({"params": split, "split": True})
    if full:
        groups.append({"params": full, "split": False})
    return groups
