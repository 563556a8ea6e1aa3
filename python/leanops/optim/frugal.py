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

Under torch.distributed every rank uses the subspace that rank 0 drew: it is broadcast at each switch (indices,
projectors, active blocks), rather than trusting that the ranks' generators agree.

``state_dict()`` carries, besides the moments, the indices / projectors, the active blocks, the step counter and
the generator state (uint8), so ``torch.load(weights_only=True)`` and a resumed run continues bit for bit.
"""
import math

import torch
import torch.distributed as dist

from .. import backends
from .. import custom_ops  # noqa: F401  - registers the split-step operators
from ..reference import frugal as split_step
from ..reference import mcf as reference_mcf

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
    if parameter.dim() == 0:
        return 1, 1
    if parameter.dim() == 1:
        return 1, parameter.shape[0]
    return parameter.shape[0], parameter.numel() // parameter.shape[0]


def _subspace_size(density: float, size: int) -> int:
    return min(size, max(0, round(density * size)))


def _from_rank_zero(drawn: Tensor) -> Tensor:
    """Under torch.distributed, every rank takes the subspace rank 0 drew (broadcast): ranks must agree on it, and
    a shared seed is not trusted to ensure that (a rank may have been seeded differently, or an svd may differ in
    its last bits). Without an initialised process group, `drawn` itself. NCCL moves CUDA tensors only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return drawn
    carrier = drawn.contiguous()
    if dist.get_backend() == "nccl" and carrier.device.type != "cuda":
        carrier = carrier.to(torch.device("cuda", torch.cuda.current_device()))
    dist.broadcast(carrier, src=0)
    return carrier.to(drawn.device)


class FRUGAL(torch.optim.Optimizer):
    """AdamW on a gradient subspace (``density`` of the coordinates) plus a state-free step on the rest.

    Args:
        params: parameters or parameter groups. Group option ``split`` (default True) says whether a group's
            parameters are split; ``frugal_param_groups(model)`` gives the usual choice. Every option below except
            precision, seed and backend can be set per group.
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
        seed: seed of the generator the subspaces are drawn from.
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
    # State.

    def state_bytes(self) -> int:
        """Bytes of per-parameter optimizer state (moments, int32 indices, projectors, Collage compensations, and the
        kernels' int32 inverse of the indices: one entry per column or row), excluding the parameters and the
        constant-size generator state."""
        state = sum(value.numel() * value.element_size() for state in self.state.values()
                    for value in state.values() if isinstance(value, Tensor))
        return state + sum(positions.numel() * positions.element_size() for _, positions in self._positions.values())

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["frugal"] = {
            "steps_taken": self._steps_taken,
            "generator": self._generator.get_state(),
            "active_blocks": {index: blocks.clone() for index, blocks in self._active_blocks.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("frugal")
        if extra is None:
            raise ValueError(f"{OPERATION}.load_state_dict: argument 'state_dict' lacks the 'frugal' entry "
                             f"(not a FRUGAL state dict)")
        saved_groups = state_dict["param_groups"]
        # The base class would cast every state tensor to its parameter's dtype (int32 indices included): load the
        # groups through it and install the state here, keeping each tensor's dtype.
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for group_index, group in enumerate(self.param_groups):
            _check_group(group, where=f" (parameter group {group_index})")
        by_id = {saved_id: parameter for saved, group in zip(saved_groups, self.param_groups)
                 for saved_id, parameter in zip(saved["params"], group["params"])}
        self.state.clear()
        self._positions.clear()
        for saved_id, saved_state in state_dict["state"].items():
            parameter = by_id[saved_id]
            self.state[parameter] = {key: value.to(device=parameter.device).clone() if isinstance(value, Tensor)
                                     else value for key, value in saved_state.items()}
        self._steps_taken = int(extra["steps_taken"])
        self._generator.set_state(extra["generator"].clone())
        self._active_blocks = {int(index): blocks.clone() for index, blocks in extra["active_blocks"].items()}

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
        new = _from_rank_zero(torch.tensor(sorted(chosen), dtype=torch.int32))
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
        rows, columns = _matrix_shape(parameter)
        state = self.state[parameter]
        project = group["on_switch"] == "project"
        if projection in ("columns", "rows"):
            size = columns if projection == "columns" else rows
            count = _subspace_size(group["density"], size)
            new = torch.randperm(size, generator=self._generator)[:count].sort().values.to(torch.int32)
            new = _from_rank_zero(new.to(parameter.device))
            old = state.get("indices")
            state["indices"] = new
            if old is None or torch.equal(old, new):
                if old is None:
                    self._fresh_moments(state, parameter, projection, new.numel())
                return
            if not project:
                self._fresh_moments(state, parameter, projection, new.numel())
                return
            dim = 1 if projection == "columns" else 0
            # Position of each new index among the old ones, -1 for a coordinate that is new.
            where_old = torch.full((size,), -1, dtype=torch.long, device=parameter.device)
            where_old[old.long()] = torch.arange(old.numel(), device=parameter.device)
            source = where_old[new.long()]
            keep = source >= 0
            for key in ("exp_avg", "exp_avg_sq"):
                shape = list(state[key].shape)
                shape[dim] = new.numel()
                moved = state[key].new_zeros(shape)
                kept = state[key].index_select(dim, source[keep])
                moved.index_copy_(dim, keep.nonzero().flatten(), kept)
                state[key] = moved
            return
        # random / svd: P on the smaller side.
        side = min(rows, columns)
        rank = _subspace_size(group["density"], side)
        if projection == "random":
            gaussian = torch.randn(side, rank, generator=self._generator, dtype=torch.float32)
            new = torch.linalg.qr(gaussian).Q if rank else gaussian
            new = new.to(parameter.device).contiguous()
        else:
            if parameter.grad is None:
                return  # drawn when a gradient is there (see step)
            gradient = parameter.grad.reshape(rows, columns).to(torch.float32)
            if rank == 0:
                new = gradient.new_zeros(side, 0)
            else:
                left, _, right_t = torch.linalg.svd(gradient, full_matrices=False)
                new = (left[:, :rank] if rows <= columns else right_t[:rank].T).contiguous()
        new = _from_rank_zero(new)
        old = state.get("projector")
        state["projector"] = new
        if old is None or not project:
            self._fresh_moments(state, parameter, projection, rank)
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
    def _fresh_moments(state: dict, parameter: Tensor, projection: str, count: int) -> None:
        rows, columns = _matrix_shape(parameter)
        if projection == "columns":
            shape = (rows, count)
        elif projection == "rows":
            shape = (count, columns)
        else:  # random / svd
            shape = (count, columns) if rows <= columns else (rows, count)
        state["step"] = 0
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=parameter.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=parameter.device)

    # -----------------------------------------------------------------------------------------------------------
    # The step.

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
        """One parameter's step in plain PyTorch (the module docstring's operations, in torch.optim.AdamW's order)."""
        compensated = self.precision == "collage" and parameter.dtype in COMPENSATED_DTYPES
        if compensated:
            low = self._compensation(parameter)
            before = parameter.detach().to(torch.float32) + low.to(torch.float32)  # exact: a 16-bit pair
            work = before.clone(memory_format=torch.contiguous_format)
        elif parameter.dtype == torch.float32 and parameter.is_contiguous():
            work = parameter
        else:
            work = parameter.detach().to(torch.float32, memory_format=torch.contiguous_format)
        gradient = parameter.grad.to(torch.float32, memory_format=torch.contiguous_format)
        if group["weight_decay"] != 0:
            work.mul_(1 - group["lr"] * group["weight_decay"])
        if not group["split"] or (active is not None and position in active):
            self._adamw(group, parameter, work, gradient)
        elif active is not None:
            self._state_free(group, work, gradient)
        else:
            self._split_update(group, parameter, work, gradient)
        if compensated:
            # The step's change (exact: work and before are within a factor 2) goes into the pair by Grow.
            high, low_part = reference_mcf.grow(parameter.detach(), low, (work - before).to(parameter.dtype))
            parameter.copy_(high)
            low.copy_(low_part)
        elif work is not parameter:
            parameter.copy_(work)

    def _compensation(self, parameter: Tensor) -> Tensor:
        """The Collage compensation theta_lo of a 16-bit parameter (zeros at first)."""
        return self.state[parameter].setdefault("param_lo", torch.zeros_like(
            parameter, memory_format=torch.contiguous_format))

    def _positions_of(self, parameter: Tensor, size: int) -> Tensor:
        """int32 (size,): the position of each column (row) in the parameter's subspace indices, -1 outside."""
        indices = self.state[parameter]["indices"]
        cached = self._positions.get(parameter)
        if cached is not None and cached[0] is indices:
            return cached[1]
        positions = torch.full((size,), -1, dtype=torch.int32, device=parameter.device)
        positions[indices.long()] = torch.arange(indices.numel(), dtype=torch.int32, device=parameter.device)
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
        random/svd projections: leanops.reference.frugal's module docstring)."""
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
            target = parameter
            if not parameter.is_contiguous():
                target = parameter.detach().contiguous()
                copies_back.append((parameter, target))
            gradient = parameter.grad
            if gradient.dtype not in (parameter.dtype, torch.float32):
                gradient = gradient.to(torch.float32)
            gradient = gradient.contiguous()
            moments, indices, addend = (no_tensor, no_tensor), no_tensor, no_tensor
            step_size, root = 0.0, 1.0
            if not group["split"] or (active is not None and position in active):
                mode = split_step.ADAMW
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(parameter.shape, dtype=torch.float32, device=device)
                    state["exp_avg_sq"] = torch.zeros(parameter.shape, dtype=torch.float32, device=device)
                moments = (state["exp_avg"], state["exp_avg_sq"])
                step_size, root = self._advance(group, state)
            elif active is not None:
                mode = split_step.FREE
            elif group["projection"] in ("columns", "rows"):
                mode = split_step.COLUMNS if group["projection"] == "columns" else split_step.ROWS
                rows, columns = _matrix_shape(parameter)
                indices = self._positions_of(parameter, columns if mode == split_step.COLUMNS else rows)
                moments = (state["exp_avg"], state["exp_avg_sq"])
                if state["indices"].numel():
                    step_size, root = self._advance(group, state)
            else:  # random / svd: AdamW on P^T G (or G P) first, in `projected`
                mode = split_step.FREE
                projector = state["projector"]
                if projector.shape[1]:
                    rows, columns = _matrix_shape(parameter)
                    matrix = gradient.to(torch.float32).view(rows, columns)
                    left = rows <= columns
                    small = projector.T @ matrix if left else matrix @ projector
                    size, root_size = self._advance(group, state)
                    projected_entries.append((len(call["params"]), matrix, projector, left, small))
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
            count = len(projected_entries)
            operator(projected["scratch"], [], projected["exp_avgs"], projected["exp_avg_sqs"], projected["grads"],
                     [no_tensor] * count, [no_tensor] * count, [split_step.ADAMW] * count, projected["step_sizes"],
                     projected["roots"], float(beta1), float(beta2), float(group["eps"]), 1.0, 0.0,
                     split_step.NONE)
            for (index, matrix, projector, left, small), update in zip(projected_entries, projected["scratch"]):
                call["addends"][index] = (projector @ update if left else update @ projector.T).contiguous()
                call["grads"][index] = matrix - (projector @ small if left else small @ projector.T)
            # One gradient dtype per call: the remainders are float32, so every gradient goes as float32 (exact).
            call["grads"] = [gradient.to(torch.float32) for gradient in call["grads"]]
        operator(call["params"], call["params_lo"], call["exp_avgs"], call["exp_avg_sqs"], call["grads"],
                 call["positions"], call["addends"], call["modes"], call["step_sizes"], call["roots"], float(beta1),
                 float(beta2), float(group["eps"]), 1 - group["lr"] * group["weight_decay"],
                 group["lr"] * group["state_free_lr_scale"], split_step.STATE_FREE_CODES[group["state_free"]])
        for parameter, target in copies_back:
            parameter.copy_(target)

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

    def _split_update(self, group: dict, parameter: Tensor, work: Tensor, gradient: Tensor) -> None:
        state = self.state[parameter]
        rows, columns = _matrix_shape(parameter)
        matrix = work.view(rows, columns)
        gradient = gradient.view(rows, columns)
        if group["projection"] in ("columns", "rows"):
            dim = 1 if group["projection"] == "columns" else 0
            indices = state["indices"].long()
            if indices.numel():
                # Gather, update with exactly AdamW's operations, scatter back: the subspace coordinates get the
                # bits AdamW on the submatrix would give.
                sub = matrix.index_select(dim, indices)
                step_size, denom = self._moments_step(group, state, gradient.index_select(dim, indices))
                sub.addcdiv_(state["exp_avg"], denom, value=-step_size)
                matrix.index_copy_(dim, indices, sub)
            if group["state_free"] != "none" and indices.numel() < matrix.shape[dim]:
                self._state_free(group, matrix, gradient.clone().index_fill_(dim, indices, 0))
            return
        projector = state["projector"]
        left = rows <= columns
        if projector.shape[1]:
            projected = projector.T @ gradient if left else gradient @ projector
            step_size, denom = self._moments_step(group, state, projected)
            direction = state["exp_avg"] / denom
            matrix.add_(projector @ direction if left else direction @ projector.T, alpha=-step_size)
            remainder = gradient - (projector @ projected if left else projected @ projector.T)
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
