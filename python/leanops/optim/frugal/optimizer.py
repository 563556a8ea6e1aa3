"""The FRUGAL optimizer: it holds the state and the draw's bookkeeping, and delegates the work to the package's
modules (options, subspaces, reference_step, fused_step, checkpoint)."""
import warnings

import torch

from .. import _distributed, _torch_options
from . import checkpoint, fused_step, options, param_groups, reference_step, state_checks, subspaces

Tensor = torch.Tensor


class FRUGAL(torch.optim.Optimizer):
    """AdamW on a gradient subspace (``density`` of the coordinates) plus a state-free step on the rest.

    Args:
        params: parameter groups, or bare parameters (or named parameters). Group option ``split`` (default True
            in a group) says whether a group's parameters are split; ``frugal_param_groups(model)`` gives the usual
            choice (recommended). Bare parameters are sorted into two groups, {"split": True} for those that look
            like projection matrices (2-D, both sides > 1, and, when named, not named like an embedding or a head:
            ``param_groups.looks_like_projection``) and {"split": False} (plain AdamW) for the others (norms,
            biases, convolution kernels), with a UserWarning saying how many are split: an embedding or an output
            head cannot be told from a projection matrix without the model. ``split_parameters()`` and the repr
            list what is split. Every option below except precision, seed and backend can be set per group.
            Parameters may be DTensors: FSDP2's ``fully_shard`` (Shard(0) on a 1-D device mesh), or Replicate
            (package docstring, "Distributed training").
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused: as
            torch.optim.AdamW, with its defaults (weight_decay=0.01: decoupled weight decay on the whole
            parameter). lr and the betas may be one-element tensors. ``maximize=True`` steps along +gradient (every
            part: AdamW, the state-free update, svd's subspace). ``foreach`` / ``fused`` are accepted and change
            nothing (``backend`` chooses how the step runs). ``amsgrad``, ``capturable`` and ``differentiable`` must
            stay False (refused by name: leanops.optim._torch_options.REFUSED says why).
        density: fraction in [0, 1] of each split parameter (or, blockwise, of the group's tensors) that is
            state-full.
        update_gap: steps between subspace switches (>= 1).
        projection: "blockwise", "columns", "rows", "random" or "svd" (package docstring).
        block_order: "random", "ascending" or "descending" (blockwise only).
        state_free: "signsgd", "sgd" or "none": the update of the state-free remainder.
        state_free_lr_scale, state_full_lr_scale: multiply lr for the state-free / state-full (AdamW) parts.
        on_switch: "reset" or "project": what the moments do when a subspace changes (package docstring).
        precision: "fp32" (moments and arithmetic in float32; a 16-bit parameter is rounded after each step), or
            "collage": moments and arithmetic in float32, and each bfloat16/float16 parameter is the pair
            (theta, theta_lo) of Collage's multi-component floats, the step's change going in with Grow, so that
            updates below theta's half-ulp accumulate (float32 parameters are updated as with "fp32").
        seed: seed of the generator the subspaces are drawn from (under torch.distributed, rank 0's counts).
        backend: "auto", "reference", "triton", "cuda" or "cpu" (leanops.backends). "reference" is the plain-PyTorch
            step (reference_step: bit for bit torch.optim.AdamW's operations on the state-full part); the others
            are the fused split-step kernels (fused_step; leanops.reference.frugal states their per-element math),
            equal to the reference up to float32 rounding. "auto": the C++ kernel on the CPU, CUDA then Triton on
            a GPU, the reference for float64 parameters.

    ``add_param_group`` checks a new group as the constructor does (its options, its parameters' dtypes, the
    backend, DTensor layouts) and adds nothing if it is refused.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, density: float = 0.25, update_gap: int = 200,
                 projection: str = "blockwise", block_order: str = "random", state_free: str = "signsgd",
                 state_free_lr_scale: float = 1.0, state_full_lr_scale: float = 1.0, on_switch: str = "reset",
                 precision: str = "fp32", seed: int = 0, backend: str = "auto"):
        _torch_options.check_amsgrad(options.OPERATION, amsgrad)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, density=density, update_gap=update_gap, projection=projection,
                        block_order=block_order, state_free=state_free, state_free_lr_scale=state_free_lr_scale,
                        state_full_lr_scale=state_full_lr_scale, on_switch=on_switch, split=True,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused)
        options.check_group(defaults)
        options.check_optimizer_options(precision, seed, backend)
        self.precision = precision
        self.seed = seed
        self.backend = backend
        if not isinstance(params, (Tensor, dict)):
            params = list(params)
            if params and not any(isinstance(entry, dict) for entry in params):
                named = isinstance(params[0], tuple)
                params, split, total = param_groups.bare_parameter_groups(params)
                warnings.warn(
                    f"{options.OPERATION}: given bare parameters, FRUGAL splits the {split} of {total} tensors that "
                    f"look like projection matrices (2-D, both sides > 1"
                    f"{', not named like an embedding or a head' if named else ''}) and gives the other "
                    f"{total - split} (norms, biases, ...) plain AdamW in a group of their own; "
                    f"an embedding or an output head cannot be told from a projection matrix without the model: "
                    f"FRUGAL(frugal_param_groups(model), ...) chooses by module (recommended); "
                    f"split_parameters() lists what is split", UserWarning, stacklevel=2)
        super().__init__(params, defaults)  # every group through add_param_group: checked there
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._steps_taken = 0
        # Blockwise groups' active sets: group index -> sorted int32 positions of its state-full tensors.
        self._active_blocks: dict[int, Tensor] = {}
        self._positions = fused_step.KernelPositions()

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim.Optimizer's, after the constructor's checks (ValueError naming the group and the option:
        FRUGAL's options, amsgrad/capturable/differentiable True, a parameter that is not floating-point;
        BackendUnavailableError for a backend that cannot step a parameter, NotImplementedError for a DTensor
        layout that is not supported). A refused group is not added. Its subspaces are drawn at its first step."""
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        try:
            options.check_group(group, options.in_group(group_index))
            # A backend that cannot serve, or a DTensor layout that is not supported, is refused before any step.
            options.check_parameters(group, group_index, self.backend)
        except Exception:
            self.param_groups.pop()
            raise
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])

    def split_parameters(self) -> list[dict]:
        """The parameters that are split (their groups have split=True: a subspace gets AdamW, the rest the
        state-free update), in group order: {"group": group index, "index": position in the group, "name": the
        name given with named parameters or None, "shape": tuple, "projection": the group's projection}."""
        split = []
        for group_index, group in enumerate(self.param_groups):
            if not group["split"]:
                continue
            names = group.get("param_names")
            for position, parameter in enumerate(group["params"]):
                split.append({"group": group_index, "index": position,
                              "name": names[position] if names else None, "shape": tuple(parameter.shape),
                              "projection": group["projection"]})
        return split

    def __repr__(self) -> str:
        """torch.optim's listing of the groups' options, then which tensors are split (split_parameters())."""
        text = super().__repr__()
        split = self.split_parameters()
        total = sum(len(group["params"]) for group in self.param_groups)
        lines = [f"Split parameters: {len(split)} of {total}"]
        shown = 20
        for entry in split[:shown]:
            name = f" {entry['name']}" if entry["name"] else ""
            lines.append(f"    group {entry['group']} index {entry['index']}{name}: {entry['shape']}, "
                         f"{entry['projection']}")
        if len(split) > shown:
            lines.append(f"    ... and {len(split) - shown} more (split_parameters())")
        return text[:-1] + "\n" + "\n".join(lines) + "\n)"

    def _process_group(self):
        """The group whose ranks share the active blocks and the generator: the first DTensor parameter's mesh
        group, else the default group (None)."""
        for group in self.param_groups:
            for parameter in group["params"]:
                if _distributed.is_dtensor(parameter):
                    return _distributed.Layout(parameter, options.OPERATION).group
        return None

    def state_bytes(self) -> int:
        """Bytes of per-parameter optimizer state held by this rank (moments, int32 indices, projectors, Collage
        compensations, and the kernels' int32 inverse of the indices: one entry per column or row), excluding the
        parameters and the constant-size generator state."""
        state = sum(value.numel() * value.element_size() for state in self.state.values()
                    for value in state.values() if isinstance(value, Tensor))
        return state + self._positions.nbytes()

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step on every parameter with a gradient (drawing the subspaces first at a switch);
        returns the loss that `closure`, if given, recomputes with gradients enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._steps_taken == 0:
            # Every rank draws with the first rank's generator: the draws are broadcast anyway, and the saved
            # generator state is then the same whichever rank's copy a checkpoint keeps.
            self._generator.set_state(subspaces.from_rank_zero(self._generator.get_state(), self._process_group()))
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None and parameter.grad.is_sparse:
                    raise ValueError(f"{options.OPERATION}: sparse gradients are not supported")
        for group_index, group in enumerate(self.param_groups):
            negated = []
            if group["maximize"]:
                # Maximizing f is minimizing -f: every part of the step (the svd draw included) sees -g, a copy
                # that replaces the gradient for the group's step only.
                negated = [(parameter, parameter.grad) for parameter in group["params"] if parameter.grad is not None]
                for parameter, gradient in negated:
                    parameter.grad = torch.neg(gradient)
            try:
                self._step_group(group_index, _torch_options.numeric_group(group))
            finally:
                for parameter, gradient in negated:
                    parameter.grad = gradient
        self._steps_taken += 1
        return loss

    def _step_group(self, group_index: int, group: dict) -> None:
        """One group's step (`group`: its options with lr and betas as Python floats)."""
        active = self._switch_subspaces(group_index, group)
        fused: dict[tuple, list[tuple[str, Tensor]]] = {}
        for position, parameter in enumerate(group["params"]):
            if parameter.grad is None:
                continue
            how = subspaces.treatment(group, position, active)
            chosen = options.resolve_backend(self.backend, parameter)
            if chosen == "reference":
                reference_step.step_parameter(self.state, group, parameter, how, self.precision)
            else:
                fused.setdefault((chosen, parameter.device, parameter.dtype), []).append((how, parameter))
        for (chosen, _, _), entries in fused.items():
            fused_step.step_group(self.state, self._positions, group, entries, chosen, self.precision)

    def _switch_subspaces(self, group_index: int, group: dict) -> set | None:
        """Draw the group's subspaces at a switch (optimizer steps 1, 1 + update_gap, ...), or where none is drawn
        yet; return the group's active blocks (blockwise; else None)."""
        if not group["split"]:
            return None
        switching = self._steps_taken % group["update_gap"] == 0
        if group["projection"] == "blockwise":
            if switching or group_index not in self._active_blocks:
                new = subspaces.draw_blocks(group, self._generator, self._steps_taken, self._process_group())
                subspaces.switch_blocks(self.state, group, self._active_blocks.get(group_index), new)
                self._active_blocks[group_index] = new
            return set(self._active_blocks[group_index].tolist())
        for parameter in group["params"]:
            state = self.state[parameter]
            # A parameter without a gradient until now gets its subspace with its first gradient.
            missing = "indices" not in state and "projector" not in state
            if switching or (missing and parameter.grad is not None):
                subspaces.draw_subspace(state, group, parameter, self._generator)
        return None

    def state_dict(self) -> dict:
        """The state as torch.optim.Optimizer's, plus, in every parameter group, the entry "frugal": the generator
        state (uint8), the optimizer steps taken and the group's active blocks (blockwise; else None), kept there so
        that torch.distributed.checkpoint (which keeps "state" and "param_groups" only) carries them. The state is
        packed so that its shapes do not depend on the draw (checkpoint's docstring)."""
        state_dict = super().state_dict()
        generator = self._generator.get_state()
        packed = {}
        for group_index, (saved_group, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            active = self._active_blocks.get(group_index) if subspaces.is_blockwise(group) else None
            packed.update(checkpoint.pack_group(self.state, group, saved_group["params"], active))
            saved_group[checkpoint.EXTRA_KEY] = checkpoint.group_extra(self._steps_taken, generator, active)
        state_dict["state"] = packed
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FRUGAL state dict (``state_dict()``'s, possibly through torch.save / torch.distributed.checkpoint).
        Everything is checked before anything changes (``check_state_dict``): a refused state dict raises
        ValueError / TypeError naming the parameter and the key, and leaves the optimizer as it was."""
        saved_groups, states, extra, active_blocks = self._checked(state_dict)
        generator_state = checkpoint.saved_generator_state(extra)
        # Checked: now load. The base class would cast every state tensor to its parameter's dtype (int32 indices
        # included): load the groups through it and install the state here, keeping each tensor's dtype.
        super().load_state_dict({"state": {}, "param_groups": checkpoint.without_extras(saved_groups)})
        _torch_options.fill_flags(self.param_groups, self.defaults)  # a state dict saved before the flags existed
        self.state.clear()
        self._positions.clear()
        self.state.update(states)
        self._steps_taken = int(extra["steps_taken"])
        self._generator.set_state(generator_state)
        self._active_blocks = active_blocks

    def check_state_dict(self, state_dict) -> None:
        """Refuse (ValueError, TypeError) a state dict this optimizer cannot load, naming the parameter (group and
        index in it) and the key; changes nothing. Checked (state_checks): the kind (FRUGAL's groups and their
        "frugal" entries), the groups' options, every parameter's keys, types, dtypes, shapes (a DTensor's global
        one) and index ranges, then the pieces this rank would keep against their local shapes."""
        self._checked(state_dict)

    def _checked(self, state_dict) -> tuple[list, dict, dict, dict]:
        """(saved groups, parameter -> unpacked state, the "frugal" entry, active blocks) of a checked state dict."""
        saved_groups, saved_state, _ = state_checks.check_state_dict(state_dict, self.param_groups, self.precision)
        extra = checkpoint.first_extra(saved_groups)
        active_blocks = checkpoint.saved_active_blocks(saved_groups)
        states = checkpoint.unpack_states(saved_state, saved_groups, self.param_groups, active_blocks)
        return saved_groups, states, extra, active_blocks
