"""Argument checks shared by the public ops: each error names the argument, and fires before any kernel runs."""
import torch


def check_tensor(op: str, name: str, value, dtypes: tuple) -> torch.Tensor:
    """`value` must be a tensor of one of `dtypes`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: argument '{name}' has dtype {value.dtype}; expected one of {allowed}")
    return value


def check_like(op: str, name: str, value, like_name: str, like: torch.Tensor, scalar_ok: bool = False) -> None:
    """`value` must be a tensor with the dtype, device and shape of `like` (or one element, where `scalar_ok`)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != like.dtype:
        raise TypeError(f"{op}: argument '{name}' has dtype {value.dtype} but '{like_name}' has dtype {like.dtype}")
    if value.device != like.device:
        raise ValueError(f"{op}: argument '{name}' is on {value.device} but '{like_name}' is on {like.device}")
    if value.shape != like.shape and not (scalar_ok and value.numel() == 1):
        extra = " (or a single element)" if scalar_ok else ""
        raise ValueError(f"{op}: argument '{name}' has shape {tuple(value.shape)} but '{like_name}' has shape "
                         f"{tuple(like.shape)}{extra}")


def check_no_shared_memory(op: str, name: str, a: torch.Tensor, other_name: str, b: torch.Tensor) -> None:
    """In-place outputs `a` and `b` must not overlap in memory (the result would depend on the write order)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or a.numel() == 0 or b.numel() == 0:
        return

    def byte_range(t: torch.Tensor) -> tuple[int, int]:
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0) + 1
        start = t.storage_offset() * t.element_size()
        return start, start + extent * t.element_size()

    (a_start, a_end), (b_start, b_end) = byte_range(a), byte_range(b)
    if a_start < b_end and b_start < a_end:
        raise ValueError(f"{op}: arguments '{name}' and '{other_name}' must not share memory")


def values_checkable(tensor: torch.Tensor) -> bool:
    """Checking a tensor's values needs a device sync and cannot be traced: done in eager mode only."""
    return not torch.compiler.is_compiling() and tensor.device.type != "meta"
