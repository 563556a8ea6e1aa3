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

float32 parameters are refused (ValueError): they need no compensation, and ``torch.optim.AdamW`` serves them.

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

from ..ops import COLLAGE
from ..ops.collage import STORAGE_DTYPES
from ..reference import mcf as reference_mcf
from . import _distributed
from ._distributed import local

Tensor = torch.Tensor

MODES = ("light", "plus")


def _check_hyperparameters(lr, betas, eps, weight_decay, mode) -> None:
    op = "leanops.optim.CollageAdamW"
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{op}: argument '{name}' must be a finite number >= 0, got {value!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"{op}: argument 'betas' must be two numbers in [0, 1), got {betas!r}")
    if mode not in MODES:
        raise ValueError(f"{op}: argument 'mode' must be one of {MODES}, got {mode!r}")


class CollageAdamW(torch.optim.Optimizer):
    """AdamW for bfloat16/float16 parameters with Collage's compensated (multi-component float) updates.

    Args:
        params: parameters or parameter groups, every parameter bfloat16 or float16.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay), per group.
        mode: "plus" (v as a compensated pair too, the default) or "light"; per group.
        track_metrics: compute EDQ and the lost-update fraction in the kernels at every step (``metrics()``).
        backend: "auto", "reference", "triton", "cuda" or "cpu" (leanops.backends).

    Parameters may be DTensors (FSDP2's ``fully_shard``, Shard(0) on a 1-D mesh, or Replicate): each rank steps its
    local shard, the state being DTensors laid out like the parameter, which ``torch.distributed.checkpoint`` saves
    and loads (module docstring).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, mode: str = "plus", track_metrics: bool = False, backend: str = "auto"):
        _check_hyperparameters(lr, betas, eps, weight_decay, mode)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode))
        for group_index, group in enumerate(self.param_groups):
            _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], group["mode"])
            for parameter_index, parameter in enumerate(group["params"]):
                if parameter.dtype not in STORAGE_DTYPES:
                    raise ValueError(
                        f"leanops.optim.CollageAdamW: parameter {parameter_index} of group {group_index} has dtype "
                        f"{parameter.dtype}; Collage keeps bfloat16 or float16 parameters (a float32 parameter "
                        f"needs no compensation: use torch.optim.AdamW for it)")
        self.track_metrics = track_metrics
        self.backend = backend
        self._metrics: list[dict] = []

    # -----------------------------------------------------------------------------------------------------------
    # State.

    @staticmethod
    def _zeros_like(parameter: Tensor) -> Tensor:
        """Contiguous zeros laid out like `parameter`: a DTensor of the same placements for a DTensor."""
        zeros = torch.zeros_like(local(parameter), memory_format=torch.contiguous_format)
        if _distributed.is_dtensor(parameter):
            return _distributed.DTensor.from_local(zeros, parameter.device_mesh, parameter.placements,
                                                   run_check=False, shape=parameter.shape, stride=parameter.stride())
        return zeros

    def _state_of(self, parameter: Tensor, plus: bool) -> dict:
        state = self.state[parameter]
        if not state:
            state["step"] = 0
            state["param_lo"] = self._zeros_like(parameter)
            state["exp_avg"] = self._zeros_like(parameter)
            state["exp_avg_sq"] = self._zeros_like(parameter)
        if plus and "exp_avg_sq_lo" not in state:
            state["exp_avg_sq_lo"] = self._zeros_like(parameter)
        return state

    def state_bytes(self) -> int:
        """Bytes of optimizer state (compensation and moments) held by this rank, excluding the parameters."""
        return sum(local(value).numel() * value.element_size() for state in self.state.values()
                   for value in state.values() if isinstance(value, Tensor))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's; for a DTensor parameter, a saved whole (plain) tensor of the parameter's
        shape, e.g. from a single-device checkpoint, is cut to this rank's shard."""
        super().load_state_dict(state_dict)
        for parameter, state in self.state.items():
            if not _distributed.is_dtensor(parameter):
                continue
            layout = _distributed.Layout(parameter, "leanops.optim.CollageAdamW.load_state_dict")
            for key, value in list(state.items()):
                if isinstance(value, Tensor) and not _distributed.is_dtensor(value):
                    if value.shape != parameter.shape:
                        raise ValueError(f"leanops.optim.CollageAdamW.load_state_dict: state '{key}' has shape "
                                         f"{tuple(value.shape)} but its parameter has {tuple(parameter.shape)}")
                    piece = layout.narrow(value, 0) if layout.sharded else value
                    zeros = self._zeros_like(parameter)
                    local(zeros).copy_(piece)
                    state[key] = zeros

    # -----------------------------------------------------------------------------------------------------------
    # The step.

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        totals: dict[torch.device, Tensor] = {}
        for group in self.param_groups:
            plus = group["mode"] == "plus"
            buckets: dict[tuple, list[Tensor]] = {}
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                if parameter.grad.is_sparse:
                    raise ValueError("leanops.optim.CollageAdamW: sparse gradients are not supported")
                state = self._state_of(parameter, plus)
                state["step"] += 1
                buckets.setdefault((parameter.device, parameter.dtype, state["step"]), []).append(parameter)
            for (device, dtype, step), parameters in buckets.items():
                metrics = None
                if self.track_metrics:
                    metrics = totals.setdefault(device, torch.zeros(4, dtype=torch.float64, device=device))
                self._apply(group, parameters, device, dtype, step, plus, metrics)
        if self.track_metrics:
            self._record_metrics(totals, self._mesh_group())
        return loss

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
        provider = COLLAGE.resolve("leanops.optim.CollageAdamW", self.backend, device, dtype)
        states = [self.state[parameter] for parameter in parameters]
        beta1, beta2 = group["betas"]
        # Bias corrections in float64 on the host (the kernels take them as float32).
        bias_correction1, bias_correction2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
        # DTensors (FSDP2): the local shards, views of the parameters' and states' storage.
        grads = [local(parameter.grad).contiguous() for parameter in parameters]
        parameters = [local(parameter) for parameter in parameters]
        if any(not parameter.is_contiguous() for parameter in parameters):
            raise ValueError("leanops.optim.CollageAdamW: parameters must be contiguous tensors")
        # An empty shard (FSDP2's last ranks when dim 0 is short) has nothing to update.
        kept = [index for index, parameter in enumerate(parameters) if parameter.numel()]
        if not kept:
            return
        states = [states[index] for index in kept]
        parameters, grads = [parameters[index] for index in kept], [grads[index] for index in kept]
        provider.operators.collage_adamw_step_(
            parameters, [local(s["param_lo"]) for s in states], [local(s["exp_avg"]) for s in states],
            [local(s["exp_avg_sq"]) for s in states], [local(s["exp_avg_sq_lo"]) for s in states] if plus else [],
            grads, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
            bias_correction1, bias_correction2, plus, metrics)

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
        """Install theta_lo for the named parameters (from split_state_dict), creating their state if needed."""
        for name, parameter in named_parameters:
            if name not in compensation:
                continue
            low = compensation[name]
            if low.shape != parameter.shape:
                raise ValueError(f"leanops.optim.CollageAdamW.load_compensation_state: '{name}' has shape "
                                 f"{tuple(low.shape)} but its parameter has {tuple(parameter.shape)}")
            plus = next(group["mode"] == "plus" for group in self.param_groups
                        if any(p is parameter for p in group["params"]))
            target = self._state_of(parameter, plus)["param_lo"]
            if _distributed.is_dtensor(parameter) and not _distributed.is_dtensor(low):
                # A whole theta_lo (split_state_dict of a full fp32 state dict): this rank's shard of it.
                layout = _distributed.Layout(parameter, "leanops.optim.CollageAdamW.load_compensation_state")
                local(target).copy_((layout.narrow(low, 0) if layout.sharded else low).to(parameter.dtype))
            else:
                target.copy_(low.to(parameter.dtype))


def split_state_dict(fp32_state: Mapping[str, Tensor], dtype: torch.dtype = torch.bfloat16) -> dict:
    """An fp32 model state dict as {"model": 16-bit state dict, "compensation": {name: low part}}: every float32
    tensor x becomes hi = F(x) (the model's) and lo = F(x - hi) (the optimizer's), so hi + lo keeps x's low bits
    (leanops.mcf.split). Other entries pass through to "model" unchanged.

    model.load_state_dict(state["model"]);
    optimizer.load_compensation_state(model.named_parameters(), state["compensation"])
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"leanops.optim.collage.split_state_dict: argument 'dtype' must be one of "
                         f"{STORAGE_DTYPES}, got {dtype}")
    model, compensation = {}, {}
    for name, value in fp32_state.items():
        if isinstance(value, Tensor) and value.dtype == torch.float32:
            model[name], compensation[name] = reference_mcf.split(value, dtype)
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
