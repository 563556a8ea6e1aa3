"""What the chunked reference primitives share: the accumulation dtype and the walk over row chunks."""
import torch


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Statistics and gradient sums accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def row_slices(rows: int, chunk: int):
    """slice(start, stop) over [0, rows) in steps of `chunk` rows (the last one shorter)."""
    for start in range(0, rows, chunk):
        yield slice(start, min(start + chunk, rows))
