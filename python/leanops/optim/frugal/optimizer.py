"""The FRUGAL optimizer: it holds the state and the draw's bookkeeping, and delegates the work to the package's
modules (options, subspaces, reference_step, fused_step, checkpoint)."""
import torch

from .. import _distributed
from . import checkpoint, fused_step, options, reference_step, state_checks, subspaces

Tensor = torch.Tensor


class FRUGAL(torch.optim.Optimizer):
    """AdamW on a gradient subspace (``density`` of the coordinates) plus a state-free step on the rest.

    Args:
        params: parameters or parameter groups. Group option ``split`` (default True) says whether a group's
            parameters are split; ``frugal_param_groups(model)`` gives the usual choice. Every option below except
            precision, seed and backend can be set per group. Parameters may be DTensors: FSDP2's ``fully_shard``
            (Shard(0) on a 1-D device mesh), or Replicate (package docstring, "Distributed training").
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay on the whole parameter).
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
        options.check_group(defaults)
        options.check_optimizer_options(precision, seed, backend)
        super().__init__(params, defaults)
        for group_index, group in enumerate(self.param_groups):
            options.check_group(group, options.in_group(group_index))
            # A backend that cannot serve, or a DTensor layout that is not supported, is refused before any step.
            options.check_parameters(group, group_index, backend)
        self.precision = precision
        self.seed = seed
        self.backend = backend
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._steps_taken = 0
        # Blockwise groups' active sets: group index -> sorted int32 positions of its state-full tensors.
        self._active_blocks: dict[int, Tensor] = {}
        self._positions = fused_step.KernelPositions()

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
        for group_index, group in enumerate(self.param_groups):
            for parameter in group["params"]:
                if parameter.grad is not None and parameter.grad.is_sparse:
                    raise ValueError(f"{options.OPERATION}: sparse gradients are not supported")
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
        self._steps_taken += 1
        return loss

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
