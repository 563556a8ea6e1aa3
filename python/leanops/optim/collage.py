"""CollageAdamW: AdamW on bfloat16 (or float16) parameters without fp32 master weights.

Mixed-precision training keeps an fp32 master copy of every weight plus fp32 moments: 14 bytes per parameter before
the gradients. Collage (Yu et al., ICML 2024) keeps everything in 16 bits and compensates the rounding with
multi-component floats (``leanops.mcf``): each parameter is the pair (theta, theta_lo), theta being the tensor the
model uses, and the update goes in with Grow, so updates far below theta's half-ulp still accumulate.

- ``mode="light"``: parameters are pairs; m and v are plain 16-bit tensors: three 16-bit tensors of state
  (theta_lo, m, v) besides the parameter itself, 6 bytes per parameter.
- ``mode="plus"``: v is a pair too, decayed with Scale by (F(beta2), beta2 - F(beta2)): bfloat16(0.999) rounds to 1.0,
  so without it v never decays at the most common beta2. 8 bytes of state per parameter.

Decoupled weight decay is part of the compensated update. The per-element math is stated once, in
``leanops.reference.collage`` (the oracle every backend matches bit for bit); the kernels apply it to all the
tensors of a (device, dtype) group in one fused multi-tensor launch.

``track_metrics=True``: after each step ``metrics()`` holds its effective descent quality EDQ = <stored change,
intended update> / |intended update|^2 (1: nothing lost) and the fraction of elements whose stored value did not
move although their update was not zero, computed inside the kernels.

float32 and float64 parameters need no compensation: they get torch.optim.AdamW's own update (its functional
``torch.optim.adamw.adamw`` with the group's options, so their trajectory is torch.optim.AdamW's bit for bit) in the
same ``step()``, with the state "step" (int), "exp_avg" and "exp_avg_sq": a bfloat16 model with float32 norms takes
one CollageAdamW. The constructor and ``add_param_group`` take torch.optim.AdamW's arguments and defaults
(``_torch_options``): weight_decay=0.01, tensor lr, maximize; amsgrad, capturable and differentiable refused by name.
Parameters may be in any dense, non-overlapping memory format (contiguous, channels-last conv weights, any order of
the dimensions): the state is made with the parameter's strides and the kernels step each tensor as one flat run
of memory (the gradient is put in the parameter's layout), so the bits are those of the same values stepped
contiguous. A step checks everything first (gradients, layouts, state, backend): a refused step changes nothing.

``load_state_dict`` checks the whole state dict before it changes anything: another optimizer's (torch.optim.AdamW's,
FRUGAL's), groups that do not match or carry invalid options, unexpected or missing keys, tensors of another shape
(a DTensor: global shape, and its local piece) or dtype, and step counts that are not ints >= 0 are refused
(ValueError, TypeError) with the parameter (group and index in it) and the key named.

Under torch.distributed: with DistributedDataParallel every rank steps the same all-reduced gradients
deterministically, so the ranks stay identical. With FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensor parameters
sharded on dim 0 of a 1-D mesh, possibly unevenly) each rank steps its local shard (``param.to_local()``, the kernels
unchanged) and keeps its state as DTensors sharded like the parameter; the update is elementwise, so the sharded run
equals the single-device one bit for bit. ``metrics()`` are summed over the mesh. ``torch.distributed.checkpoint``
round-trips model and optimizer through ``get_state_dict`` / ``set_state_dict`` (state: ``step``, and the
DTensors ``param_lo``, ``exp_avg``, ``exp_avg_sq``, ``exp_avg_sq_lo``), and a resumed run continues bit for bit.
"""
import math
from collections.abc import Iterable, Mapping

import torch
from torch.optim.adamw import adamw as torch_adamw  # the functional torch.optim.AdamW.step calls

from ..ops import COLLAGE
from ..ops.collage import STORAGE_DTYPES
from ..reference import mcf as reference_mcf
from . import _distributed, _state_checks, _torch_options
from ._distributed import local

Tensor = torch.Tensor

MODES = ("light", "plus")
# The tensors of a parameter's state, each of the parameter's dtype, shape and strides.
STATE_TENSORS = ("param_lo", "exp_avg", "exp_avg_sq", "exp_avg_sq_lo")
# Parameters that need no compensation: torch.optim.AdamW's update, state "step" (int), "exp_avg", "exp_avg_sq".
PLAIN_DTYPES = (torch.float32, torch.float64)
PLAIN_STATE_TENSORS = ("exp_avg", "exp_avg_sq")
OPERATION = "leanops.optim.CollageAdamW"


def _check_hyperparameters(lr, betas, eps, weight_decay, mode, where: str = "",
                           op: str = "leanops.optim.CollageAdamW") -> None:
    """ValueError unless the options are valid; `where` names the parameter group in the message. lr and each beta
    may be one-element tensors (as torch.optim.AdamW takes them)."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        number = _torch_options.as_number(value) if name == "lr" else (
            None if isinstance(value, (bool, Tensor)) or not isinstance(value, (int, float)) else float(value))
        if number is None or not math.isfinite(number) or number < 0:
            raise ValueError(f"{op}: argument '{name}'{where} must be a finite number >= 0 (lr: or a one-element "
                             f"tensor), got {value!r}")
    numbers = [_torch_options.as_number(b) for b in betas] if isinstance(betas, (tuple, list)) else []
    if len(numbers) != 2 or not all(b is not None and 0.0 <= b < 1.0 for b in numbers):
        raise ValueError(f"{op}: argument 'betas'{where} must be two numbers in [0, 1), got {betas!r}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{op}: argument 'mode'{where} must be one of {MODES}, got {mode!r}")


class CollageAdamW(torch.optim.Optimizer):
    """AdamW for bfloat16/float16 parameters with Collage's compensated (multi-component float) updates; float32 and
    float64 parameters in the same optimizer get torch.optim.AdamW's own update.

    Args:
        params: parameters or parameter groups (or named parameters, as torch.optim takes them). bfloat16/float16
            parameters get the Collage step; float32/float64 ones (a bf16 model's float32 norms) get plain AdamW,
            torch's implementation with the group's options (state "step", "exp_avg", "exp_avg_sq"), in the same
            ``step()``.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused: as
            torch.optim.AdamW, with its defaults (weight_decay=0.01; decoupled weight decay), per group. lr and the
            betas may be one-element tensors. ``maximize=True`` steps along +gradient. ``foreach`` / ``fused`` change
            nothing for 16-bit parameters (the kernels are fused multi-tensor steps) and go to torch's AdamW for the
            float32/float64 ones. ``amsgrad``, ``capturable`` and ``differentiable`` must stay False (refused by
            name: leanops.optim._torch_options.REFUSED says why).
        mode: "plus" (v as a compensated pair too, the default) or "light"; per group.
        track_metrics: compute EDQ and the lost-update fraction in the kernels at every step (``metrics()``; 16-bit
            parameters only).
        backend: "auto", "reference", "triton", "cuda" or "cpu" (leanops.backends), for the 16-bit parameters.

    ``add_param_group`` checks a new group as the constructor does (its options and its parameters' dtypes) and
    adds nothing if it is refused.

    Parameters may be DTensors (FSDP2's ``fully_shard``, Shard(0) on a 1-D mesh, or Replicate): each rank steps its
    local shard, the state being DTensors laid out like the parameter, which ``torch.distributed.checkpoint`` saves
    and loads (module docstring).
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, mode: str = "plus", track_metrics: bool = False, backend: str = "auto"):
        _torch_options.check_amsgrad(OPERATION, amsgrad)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, mode=mode, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused)
        _check_hyperparameters(lr, betas, eps, weight_decay, mode)
        _torch_options.check_flags(OPERATION, defaults)
        self.track_metrics = track_metrics
        self.backend = backend
        self._metrics: list[dict] = []
        super().__init__(params, defaults)  # every group through add_param_group: checked there

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim.Optimizer's, after the constructor's checks (ValueError naming the group and the option
        or parameter: options out of range, amsgrad/capturable/differentiable True, a parameter that is not
        bfloat16, float16, float32 or float64). A refused group is not added."""
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        try:
            where = f" (parameter group {group_index})"
            _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], group["mode"],
                                   where=where)
            _torch_options.check_flags(OPERATION, group, where)
            for parameter_index, parameter in enumerate(group["params"]):
                if parameter.dtype not in STORAGE_DTYPES + PLAIN_DTYPES:
                    raise ValueError(
                        f"{OPERATION}: parameter {parameter_index} of group {group_index} has dtype "
                        f"{parameter.dtype}; CollageAdamW steps bfloat16 or float16 parameters (compensated) and "
                        f"float32 or float64 ones (plain AdamW)")
        except Exception:
            self.param_groups.pop()
            raise
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])

    # -----------------------------------------------------------------------------------------------------------
    # State.

    @staticmethod
    def _zeros_like(parameter: Tensor) -> Tensor:
        """Zeros laid out like `parameter` (its strides: channels-last stays channels-last, so the elementwise
        kernels step both as one flat run of memory): a DTensor of the same placements for a DTensor."""
        zeros = torch.zeros_like(local(parameter), memory_format=torch.preserve_format)
        if _distributed.is_dtensor(parameter):
            return _distributed.DTensor.from_local(zeros, parameter.device_mesh, parameter.placements,
                                                   run_check=False, shape=parameter.shape, stride=parameter.stride())
        return zeros

    def _state_of(self, parameter: Tensor, plus: bool, relayout: bool = True) -> dict:
        """The parameter's state, made (zeros, the parameter's strides) where missing; `relayout`: give the state
        the parameter's strides (the step passes False where _check_step_input found them equal)."""
        state = self.state[parameter]
        plain = parameter.dtype in PLAIN_DTYPES
        if not state:
            state["step"] = 0
            if not plain:
                state["param_lo"] = self._zeros_like(parameter)
            state["exp_avg"] = self._zeros_like(parameter)
            state["exp_avg_sq"] = self._zeros_like(parameter)
        if plus and not plain and "exp_avg_sq_lo" not in state:
            state["exp_avg_sq_lo"] = self._zeros_like(parameter)
        if relayout:
            self._match_layout(parameter, state)
        return state

    def _match_layout(self, parameter: Tensor, state: dict) -> None:
        """Give every state tensor the parameter's strides (values unchanged): state made or loaded before the
        parameter changed its memory format (``module.to(memory_format=torch.channels_last)``), or a contiguous
        checkpoint's state for a channels-last parameter."""
        sharded = _distributed.is_dtensor(parameter)
        strides = (parameter.to_local() if sharded else parameter).stride()
        for key in STATE_TENSORS:
            value = state.get(key)
            if value is not None and (value.to_local() if sharded else value).stride() != strides:
                relaid = self._zeros_like(parameter)
                local(relaid).copy_(local(value))
                state[key] = relaid

    def state_bytes(self) -> int:
        """Bytes of optimizer state (compensation and moments) held by this rank, excluding the parameters."""
        return sum(local(value).numel() * value.element_size() for state in self.state.values()
                   for value in state.values() if isinstance(value, Tensor))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's, after checking the whole state dict (``check_state_dict``): another
        optimizer's state dict, a missing or unexpected key, a tensor of the wrong shape or dtype, or a step count
        that is not an int >= 0 is refused (ValueError, TypeError) with the parameter and the key named, and the
        optimizer is left unchanged. For a DTensor parameter, a saved whole (plain) tensor of the parameter's shape,
        e.g. from a single-device checkpoint, is cut to this rank's shard. State tensors take their parameter's
        memory format (channels-last included)."""
        self.check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        _torch_options.fill_flags(self.param_groups, self.defaults)  # a state dict saved before the flags existed
        for parameter, state in self.state.items():
            if not isinstance(parameter, Tensor):
                continue
            if _distributed.is_dtensor(parameter):
                layout = _distributed.Layout(parameter, "leanops.optim.CollageAdamW.load_state_dict")
                for key, value in list(state.items()):
                    if isinstance(value, Tensor) and not _distributed.is_dtensor(value):
                        piece = layout.narrow(value, 0) if layout.sharded else value
                        zeros = self._zeros_like(parameter)
                        local(zeros).copy_(piece)
                        state[key] = zeros
            self._match_layout(parameter, state)

    def check_state_dict(self, state_dict) -> None:
        """Refuse (ValueError, TypeError) a state dict this optimizer cannot load, naming the parameter (group and
        index in it) and the key; changes nothing. It must be a CollageAdamW state dict: as many groups, of as many
        parameters, as this optimizer; every group with valid lr, betas, eps, weight_decay, mode and torch.optim
        flags (maximize, foreach, fused; capturable, differentiable False; absent ones take this optimizer's
        defaults); every 16-bit parameter's state either empty or {"step": int >= 0, "param_lo", "exp_avg",
        "exp_avg_sq" (+ "exp_avg_sq_lo", optional: plus mode starts it at zero)}, every float32/float64
        parameter's either empty or {"step": int >= 0, "exp_avg", "exp_avg_sq"} (plain AdamW: no compensation),
        each tensor of the parameter's dtype and shape (a DTensor: its global shape, and its local piece the
        parameter's)."""
        operation = "leanops.optim.CollageAdamW.load_state_dict"
        saved_groups, saved_state, where = _state_checks.check_structure(operation, state_dict, self.param_groups)
        _state_checks.check_kind(operation, saved_groups, self.param_groups,
                                 ("lr", "betas", "eps", "weight_decay", "mode"),
                                 own_keys=("mode",))
        for group_index, saved in enumerate(saved_groups):
            _check_hyperparameters(saved["lr"], saved["betas"], saved["eps"], saved["weight_decay"], saved["mode"],
                                   where=f" (parameter group {group_index} of argument 'state_dict')", op=operation)
            _torch_options.check_flags(operation, saved, f" (parameter group {group_index} of argument 'state_dict')")
        for saved_id, entry in saved_state.items():
            group_index, position, parameter = where[saved_id]
            name = _state_checks.parameter_name(group_index, position)
            if not entry:
                continue
            if parameter.dtype in PLAIN_DTYPES:  # torch.optim.AdamW's update: no compensation
                _state_checks.check_keys(operation, name, entry, ("step",) + PLAIN_STATE_TENSORS,
                                         required=("step",) + PLAIN_STATE_TENSORS)
            else:
                _state_checks.check_keys(operation, name, entry, ("step",) + STATE_TENSORS,
                                         required=("step", "param_lo", "exp_avg", "exp_avg_sq"))
            _state_checks.check_step_count(operation, name, "step", entry["step"])
            if _distributed.is_dtensor(parameter):
                _distributed.Layout(parameter, operation)  # a layout it cannot cut to: refused before loading
            for key in STATE_TENSORS:
                if key in entry:
                    _state_checks.check_tensor(operation, name, key, entry[key], parameter.dtype, [parameter.shape],
                                               parameter, local_shape=local(parameter).shape)

    # -----------------------------------------------------------------------------------------------------------
    # The step.

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter with a gradient: 16-bit parameters through the Collage kernels, float32 and
        float64 ones through torch.optim.AdamW's functional update (``_plain_adamw``). Everything is checked first
        (gradients, parameter layouts, state shapes and dtypes, the backend), so a refused step changes nothing,
        step counts included."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = []
        for group_index, group in enumerate(self.param_groups):
            plus = group["mode"] == "plus"
            buckets: dict[tuple, list[Tensor]] = {}
            plain = []
            for position, parameter in enumerate(group["params"]):
                if parameter.grad is None:
                    continue
                relayout = self._check_step_input(group_index, position, parameter)
                if parameter.dtype in PLAIN_DTYPES:
                    plain.append(parameter)
                    continue
                step = self.state[parameter]["step"] + 1 if self.state.get(parameter) else 1
                buckets.setdefault((parameter.device, parameter.dtype, step), []).append((parameter, relayout))
            for device, dtype, _ in buckets:
                COLLAGE.resolve(OPERATION, self.backend, device, dtype)
            plans.append((group, plus, buckets, plain))
        totals: dict[torch.device, Tensor] = {}
        for group, plus, buckets, plain in plans:
            for (device, dtype, step), entries in buckets.items():
                metrics = None
                if self.track_metrics:
                    metrics = totals.setdefault(device, torch.zeros(4, dtype=torch.float64, device=device))
                states = [self._state_of(parameter, plus, relayout) for parameter, relayout in entries]
                self._apply(group, [parameter for parameter, _ in entries], device, dtype, step, plus, metrics)
                for state in states:  # counted once the kernel has run
                    state["step"] = step
            if plain:
                self._plain_adamw(group, plain)
        if self.track_metrics:
            self._record_metrics(totals, self._mesh_group())
        return loss

    def _plain_adamw(self, group: dict, parameters: list[Tensor]) -> None:
        """torch.optim.AdamW's update of float32/float64 `parameters` (its functional ``torch.optim.adamw.adamw``,
        called as AdamW.step calls it, with the group's lr, betas, eps, weight_decay, maximize, foreach and fused),
        so their trajectory is torch.optim.AdamW's bit for bit. The step count is kept as an int (this optimizer's
        state dict), handed to torch as the tensor it keeps."""
        states = [self._state_of(parameter, False) for parameter in parameters]
        on_device = bool(group["fused"])  # torch keeps the step on the parameter's device for fused steps
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        steps = [torch.tensor(float(state["step"]), dtype=torch.float32 if on_device else scalar_dtype,
                              device=local(parameter).device if on_device else "cpu")
                 for parameter, state in zip(parameters, states)]
        lr = group["lr"]
        if group["foreach"] and isinstance(lr, Tensor):
            lr = float(lr)  # torch's foreach step takes no tensor lr (without capturable)
        beta1, beta2 = group["betas"]
        torch_adamw(
            parameters, [parameter.grad for parameter in parameters], [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states], [], steps, foreach=group["foreach"], capturable=False,
            differentiable=False, fused=group["fused"], grad_scale=None, found_inf=None, has_complex=False,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=group["maximize"])
        for state in states:
            state["step"] += 1

    def _check_step_input(self, group_index: int, position: int, parameter: Tensor) -> bool:
        """ValueError, naming the parameter, for what the step cannot take: a sparse gradient, or one of another
        shape; a parameter (local shard) that is not dense and non-overlapping; state (set by hand) of the wrong
        shape, dtype or device. Returns whether the state's strides differ from the parameter's (_match_layout).
        (Written for speed: it runs for every parameter at every step.)"""
        sharded = _distributed.is_dtensor(parameter)
        tensor = parameter.to_local() if sharded else parameter
        grad = parameter.grad
        if grad.layout != torch.strided or (grad.to_local() if sharded else grad).shape != tensor.shape:
            self._refuse_step_input(group_index, position, parameter, None)
        plain = tensor.dtype in PLAIN_DTYPES
        if not plain and not tensor.is_contiguous() and memory_order(tensor) is None:
            self._refuse_step_input(group_index, position, parameter, None)
        state = self.state.get(parameter)
        if not state:
            return False
        shape, dtype, device, strides = tensor.shape, tensor.dtype, tensor.device, tensor.stride()
        relayout = False
        step = state.get("step")
        if type(step) is not int:
            self._refuse_step_input(group_index, position, parameter, "step")
        for key in STATE_TENSORS:
            value = state.get(key)
            if value is None:
                if key != "exp_avg_sq_lo" and not (plain and key == "param_lo"):
                    self._refuse_step_input(group_index, position, parameter, key)
                continue
            piece = value.to_local() if sharded and _distributed.is_dtensor(value) else value
            if (not isinstance(piece, Tensor) or piece.shape != shape or piece.dtype != dtype
                    or piece.device != device):
                self._refuse_step_input(group_index, position, parameter, key)
            relayout = relayout or piece.stride() != strides
        return relayout

    def _refuse_step_input(self, group_index: int, position: int, parameter: Tensor, key: str | None):
        """The ValueError of _check_step_input: what is wrong with the parameter (key None) or its state `key`."""
        operation = "leanops.optim.CollageAdamW"
        name = _state_checks.parameter_name(group_index, position)
        tensor, grad = local(parameter), parameter.grad
        if key is None:
            if grad.is_sparse or grad.layout != torch.strided:
                raise ValueError(f"{operation}: {name}: sparse gradients are not supported")
            if local(grad).shape != tensor.shape:
                raise ValueError(f"{operation}: {name}: the gradient has shape {tuple(local(grad).shape)}, the "
                                 f"parameter {tuple(tensor.shape)}")
            raise ValueError(f"{operation}: {name} (shape {tuple(parameter.shape)}, strides {tensor.stride()}) "
                             f"overlaps itself or has gaps: the step takes dense parameters (contiguous, "
                             f"channels-last, or any other order of the dimensions)")
        value = self.state[parameter].get(key)
        if key == "step":
            raise ValueError(f"{operation}: {name}: state 'step' must be an int, got {value!r}")
        if value is None:
            raise ValueError(f"{operation}: {name}: state lacks {key!r}")
        described = (f"a {type(value).__name__}" if not isinstance(value, Tensor) else
                     f"{tuple(local(value).shape)} {value.dtype} on {value.device}")
        raise ValueError(f"{operation}: {name}: state {key!r} is {described}, the parameter "
                         f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")

    def _mesh_group(self):
        """The process group of the first sharded DTensor parameter's mesh (the shards' metrics are summed over it),
        or None."""
        for group in self.param_groups:
            for parameter in group["params"]:
                if _distributed.is_dtensor(parameter) and parameter.device_mesh.ndim == 1 and any(
                        placement.is_shard() for placement in parameter.placements):
                    return parameter.device_mesh.get_group()
        return None

    def _apply(self, group: dict, parameters: list[Tensor], device: torch.device, dtype: torch.dtype, step: int,
               plus: bool, metrics: Tensor | None) -> None:
        """One fused step of `parameters` (one device, dtype and step count) through the chosen backend."""
        provider = COLLAGE.resolve(OPERATION, self.backend, device, dtype)
        states = [self.state[parameter] for parameter in parameters]
        parameters_with_grads = parameters
        beta1, beta2 = (float(beta) for beta in group["betas"])  # one-element tensors too
        # Bias corrections in float64 on the host (the kernels take them as float32).
        bias_correction1, bias_correction2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
        # DTensors (FSDP2): the local shards, views of the parameters' and states' storage. The step is elementwise:
        # a contiguous parameter goes as it is; another dense one (channels-last) as a flat view in its memory order,
        # its state likewise (the state shares the parameter's strides: _match_layout), its gradient put in that
        # order, so it is stepped in place with the bits of the same values laid out contiguously.
        parameters = [local(parameter) for parameter in parameters]
        orders = [None if parameter.is_contiguous() else memory_order(parameter) for parameter in parameters]
        grads = [local(parameter.grad) for parameter in parameters_with_grads]
        grads = [grad.contiguous() if order is None else flat(grad, order, copy=True)
                 for grad, order in zip(grads, orders)]
        if group["maximize"]:
            # Maximizing f is minimizing -f: the kernels get -g (exact in every dtype; a copy, the user's gradient
            # stays as it is).
            grads = [torch.neg(grad) for grad in grads]
        parameters = [parameter if order is None else flat(parameter, order)
                      for parameter, order in zip(parameters, orders)]
        # An empty shard (FSDP2's last ranks when dim 0 is short) has nothing to update.
        kept = [index for index, parameter in enumerate(parameters) if parameter.numel()]
        if not kept:
            return
        if len(kept) < len(parameters):
            states, orders = [states[index] for index in kept], [orders[index] for index in kept]
            parameters, grads = [parameters[index] for index in kept], [grads[index] for index in kept]

        def views(key: str) -> list[Tensor]:
            return [local(state[key]) if order is None else flat(local(state[key]), order)
                    for state, order in zip(states, orders)]

        provider.operators.collage_adamw_step_(
            parameters, views("param_lo"), views("exp_avg"), views("exp_avg_sq"),
            views("exp_avg_sq_lo") if plus else [], grads, float(group["lr"]), float(beta1), float(beta2),
            float(group["eps"]), float(group["weight_decay"]), bias_correction1, bias_correction2, plus, metrics)

    def _record_metrics(self, totals: dict[torch.device, Tensor], mesh_group=None) -> None:
        summed = sum((total.cpu() for total in totals.values()), torch.zeros(4, dtype=torch.float64))
        if mesh_group is not None:  # FSDP2: each rank measured its shards
            summed = _distributed.all_reduce_sum(summed, mesh_group)
        stored_dot_intended, intended_square, lost, count = summed.tolist()
        self._metrics.append({
            "step": len(self._metrics) + 1,
            "edq": stored_dot_intended / intended_square if intended_square > 0 else 1.0,
            "lost_fraction": lost / count if count else 0.0,
            "elements": int(count),
        })

    def metrics(self) -> list[dict]:
        """Per step (with track_metrics=True): {"step", "edq", "lost_fraction", "elements"}."""
        return list(self._metrics)

    # -----------------------------------------------------------------------------------------------------------
    # fp32 interchange.

    def compensation_state(self, named_parameters: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
        """{name: theta_lo} for the named parameters that have state (see merge_state_dict); a DTensor for a DTensor
        parameter (``full_tensor()`` gathers it)."""
        return {name: self.state[parameter]["param_lo"].clone() for name, parameter in named_parameters
                if parameter in self.state and "param_lo" in self.state[parameter]}

    def load_compensation_state(self, named_parameters: Iterable[tuple[str, Tensor]],
                                compensation: Mapping[str, Tensor]) -> None:
        """Install theta_lo for the named parameters (from split_state_dict), creating their state if needed. Every
        entry is checked first (a tensor of its parameter's shape and dtype): a refused call changes nothing."""
        operation = "leanops.optim.CollageAdamW.load_compensation_state"
        chosen = []
        for name, parameter in named_parameters:
            if name not in compensation:
                continue
            low = compensation[name]
            if not isinstance(low, Tensor):
                raise TypeError(f"{operation}: '{name}' must be a tensor, got {type(low).__name__}")
            if low.shape != parameter.shape:
                raise ValueError(f"{operation}: '{name}' has shape {tuple(low.shape)} but its parameter has "
                                 f"{tuple(parameter.shape)}")
            if parameter.dtype in PLAIN_DTYPES:
                raise ValueError(f"{operation}: '{name}' is a {parameter.dtype} parameter, which keeps no "
                                 f"compensation (plain AdamW): keep it out of the split (split_state_dict's "
                                 f"argument 'keep') and load its value with the model")
            if low.dtype != parameter.dtype:
                raise ValueError(f"{operation}: '{name}' has dtype {low.dtype} but its parameter has "
                                 f"{parameter.dtype} (split_state_dict's argument 'dtype' must be the model's)")
            plus = next((group["mode"] == "plus" for group in self.param_groups
                         if any(p is parameter for p in group["params"])), None)
            if plus is None:
                raise ValueError(f"{operation}: '{name}' is not a parameter of this optimizer")
            chosen.append((parameter, low, plus))
        for parameter, low, plus in chosen:
            target = self._state_of(parameter, plus)["param_lo"]
            if _distributed.is_dtensor(parameter) and not _distributed.is_dtensor(low):
                # A whole theta_lo (split_state_dict of a full fp32 state dict): this rank's shard of it.
                layout = _distributed.Layout(parameter, operation)
                local(target).copy_(layout.narrow(low, 0) if layout.sharded else low)
            else:
                target.copy_(low)


def memory_order(tensor: Tensor) -> list[int] | None:
    """The dimensions of `tensor` from outermost to innermost in memory (``tensor.permute(order)`` is contiguous)
    if it is dense and non-overlapping (contiguous, channels-last, any permutation); None otherwise."""
    if tensor.is_contiguous():
        return list(range(tensor.dim()))
    order = sorted(range(tensor.dim()), key=lambda dim: (tensor.stride(dim), tensor.size(dim)), reverse=True)
    return order if tensor.permute(order).is_contiguous() else None


def flat(tensor: Tensor, order: list[int], copy: bool = False) -> Tensor:
    """`tensor` as a 1-D view in the memory order `order` (memory_order of the parameter). A tensor of other
    strides (a gradient) is first copied into that order (`copy`); for the state it would be a bug: ValueError."""
    permuted = tensor.permute(order)
    if not permuted.is_contiguous():
        if not copy:
            raise ValueError("leanops.optim.CollageAdamW: a state tensor's strides differ from its parameter's")
        permuted = permuted.contiguous()
    return permuted.view(-1)


def split_state_dict(fp32_state: Mapping[str, Tensor], dtype: torch.dtype = torch.bfloat16,
                     keep: Iterable[str] = ()) -> dict:
    """An fp32 model state dict as {"model": 16-bit state dict, "compensation": {name: low part}}: every float32
    tensor x becomes hi = F(x) (the model's) and lo = F(x - hi) (the optimizer's), so hi + lo keeps x's low bits
    (leanops.mcf.split). Other entries, and the float32 tensors named in `keep` (a bfloat16 model's float32
    parameters, e.g. its norms: ``[n for n, p in model.named_parameters() if p.dtype == torch.float32]``), pass
    through to "model" unchanged. A non-finite element (an attention mask's
    -inf) stays itself in hi, with lo 0. A finite value beyond F's range (float16: |x| > 65504) would become inf:
    ValueError naming the tensor, before anything is returned.

    model.load_state_dict(state["model"]);
    optimizer.load_compensation_state(model.named_parameters(), state["compensation"])
    """
    operation = "leanops.optim.collage.split_state_dict"
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"{operation}: argument 'dtype' must be one of {STORAGE_DTYPES}, got {dtype}")
    if isinstance(keep, str):
        raise TypeError(f"{operation}: argument 'keep' must be an iterable of names, not a string")
    keep = set(keep)
    model, compensation = {}, {}
    for name, value in fp32_state.items():
        if isinstance(value, Tensor) and value.dtype == torch.float32 and name not in keep:
            high, low = reference_mcf.split(value, dtype)
            # Checked on this rank's piece of a DTensor (no collective).
            overflow = torch.isfinite(local(value)) & ~torch.isfinite(local(high))
            if bool(overflow.any()):
                largest = local(value)[overflow].abs().max().item()
                raise ValueError(f"{operation}: tensor '{name}' holds {int(overflow.sum())} finite values beyond "
                                 f"{dtype}'s range (largest magnitude {largest:.6g}, {dtype} reaches "
                                 f"{torch.finfo(dtype).max:.6g}): they would become inf")
            model[name], compensation[name] = high, torch.where(torch.isfinite(value), low, torch.zeros_like(low))
        else:
            model[name] = value
    return {"model": model, "compensation": compensation}


def merge_state_dict(state: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The inverse of split_state_dict: {"model": ..., "compensation": ...} to an fp32 model state dict, each
    parameter the float32 nearest to hi + lo (exactly hi + lo for bfloat16 pairs)."""
    model, compensation = state["model"], state.get("compensation", {})
    merged = {}
    for name, value in model.items():
        if name in compensation:
            merged[name] = reference_mcf.merge(value, compensation[name].to(value.device))
        elif isinstance(value, Tensor) and value.dtype in STORAGE_DTYPES:
            merged[name] = value.to(torch.float32)
        else:
            merged[name] = value
    return merged
