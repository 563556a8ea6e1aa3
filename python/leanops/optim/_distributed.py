"""How the optimizers see parameters under torch.distributed: plain tensors (single device, DDP) and DTensors (FSDP2's
``fully_shard``: Shard(0) on a 1-D device mesh, possibly uneven, the last ranks' shards smaller or empty).

An optimizer steps the local piece of each parameter (``param.to_local()``, contiguous for a Shard(0) DTensor) with
its local gradient; a parameter is handled as the matrix ``view(shape[0], -1)`` (a 1-D tensor as one row), so a
Shard(0) 2-D+ parameter holds a range of the matrix's rows on each rank, and a Shard(0) 1-D parameter a range of
its columns. `Layout` says which.
"""
import math

import torch
import torch.distributed as dist

Tensor = torch.Tensor

try:  # torch.distributed.tensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor = Replicate = Shard = None


def is_dtensor(value) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def local(value):
    """The local tensor of a DTensor (a view: in-place changes reach the DTensor), anything else unchanged."""
    return value.to_local() if is_dtensor(value) else value


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(tuple(shape)):
        stride.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(stride))


class Layout:
    """One parameter on this rank. ``rows, columns``: the (global) matrix view; ``axis``: None (this rank holds the
    whole matrix), 0 (a range of rows) or 1 (a range of columns: a sharded 1-D parameter); ``start, stop``: that
    range; ``mesh``: the DTensor's device mesh (None for a plain tensor)."""

    __slots__ = ("tensor", "mesh", "placements", "axis", "start", "stop", "rows", "columns")

    def __init__(self, parameter: Tensor, operation: str):
        shape = tuple(parameter.shape)
        self.rows, self.columns = matrix_shape(shape)
        self.mesh, self.placements, self.axis = None, None, None
        self.tensor = local(parameter)
        if not is_dtensor(parameter):
            return
        mesh, placements = parameter.device_mesh, tuple(parameter.placements)
        self.mesh, self.placements = mesh, placements
        if mesh.ndim != 1 or len(placements) != 1 or not (
                isinstance(placements[0], Replicate)
                or (type(placements[0]) is Shard and placements[0].dim == 0)):
            raise NotImplementedError(
                f"{operation}: a DTensor parameter with placements {placements} on a {mesh.ndim}-D device mesh is "
                f"not supported: FSDP2's fully_shard on a 1-D mesh (Shard(0)), or Replicate, are")
        if isinstance(placements[0], Replicate):
            return
        size, ranks = shape[0], mesh.size()
        chunk = math.ceil(size / ranks)
        start = min(mesh.get_local_rank() * chunk, size)
        stop = start + self.tensor.shape[0]
        if stop != min(start + chunk, size):
            raise NotImplementedError(
                f"{operation}: a Shard(0) DTensor parameter whose local shard ({self.tensor.shape[0]} of {size} "
                f"along dim 0 on rank {mesh.get_local_rank()} of {ranks}) is not torch.chunk's is not supported")
        self.axis = 0 if len(shape) >= 2 else 1
        self.start, self.stop = start, stop

    @property
    def sharded(self) -> bool:
        return self.axis is not None

    @property
    def local_shape(self) -> tuple[int, int]:
        """This rank's part of the matrix view."""
        if self.axis == 0:
            return self.stop - self.start, self.columns
        if self.axis == 1:
            return self.rows, self.stop - self.start
        return self.rows, self.columns

    @property
    def group(self):
        """The process group of the parameter's mesh (None: the default group)."""
        return self.mesh.get_group() if self.mesh is not None else None

    def local_range(self, dim: int) -> tuple[int, int] | None:
        """(start, stop) of this rank's part of the matrix along `dim` (0 rows, 1 columns); None if it is whole."""
        return (self.start, self.stop) if self.axis == dim else None

    def wrap(self, value: Tensor, dim: int | None, global_shape) -> Tensor:
        """`value` (this rank's piece of a state tensor) as the DTensor that torch.distributed.checkpoint saves:
        sharded along `dim` like the parameter (global shape `global_shape`), or, dim None, replicated. A plain
        tensor stays plain for a plain parameter."""
        if self.mesh is None:
            return value
        placement = Replicate() if dim is None or not self.sharded else Shard(dim)
        return DTensor.from_local(value, self.mesh, [placement], run_check=False, shape=torch.Size(global_shape),
                                  stride=_contiguous_stride(global_shape))

    def narrow(self, value: Tensor, dim: int) -> Tensor:
        """This rank's part, along `dim`, of a whole (unsharded) state tensor."""
        if not self.sharded:
            return value
        return value.narrow(dim, self.start, self.stop - self.start)


def matrix_shape(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def distributed(group=None) -> bool:
    """Whether a process group of more than one rank is there."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _carrier_device(tensor: Tensor, group) -> torch.device:
    """NCCL moves CUDA tensors only."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def broadcast_from_first(value: Tensor, group=None) -> Tensor:
    """The group's first rank's `value` on every rank of `group` (default group: None); `value` itself without a
    process group of more than one rank."""
    if not distributed(group):
        return value
    carrier = value.contiguous().to(_carrier_device(value, group))
    if carrier is value:
        carrier = value.clone()
    source = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(carrier, src=source, group=group)
    return carrier.to(value.device)


def all_reduce_sum(value: Tensor, group=None) -> Tensor:
    """The sum over `group` of `value` (in place where the device allows)."""
    if not distributed(group):
        return value
    device = _carrier_device(value, group)
    carrier = value if device == value.device and value.is_contiguous() else value.contiguous().to(device)
    dist.all_reduce(carrier, group=group)
    if carrier is not value:
        value.copy_(carrier.to(value.device))
    return value
