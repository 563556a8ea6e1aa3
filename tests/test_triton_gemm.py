"""triton_kernels/gemm.py, the GEMM of the loss plans' backward (under Triton's interpreter on the CPU): C (+)= alpha
A B for strided (transposed) operands, split-K with ordered partials, float32 or 16-bit output, against float64."""
import pytest
import torch

from helpers import INTERPRETER_BFLOAT16

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matmul_matches_float64(dtype, transposed, accumulate, splits):
    if dtype == torch.bfloat16 and _device() == "cpu":
        pytest.skip(INTERPRETER_BFLOAT16)
    from leanops.triton_kernels import gemm
    generator = torch.Generator().manual_seed(splits + 2 * accumulate + 4 * transposed)
    m, k, n = 37, 70, 21  # no multiple of any tile
    a = torch.randn((k, m) if transposed else (m, k), generator=generator).to(dtype).to(_device())
    a = a.T if transposed else a
    b = torch.randn(k, n, generator=generator).to(dtype).to(_device())
    start = torch.randn(m, n, generator=generator).to(_device())
    out = start.clone()
    alpha = torch.tensor([0.5], device=_device())
    gemm.matmul(a, b, out, alpha, accumulate=accumulate, splits=splits)
    expected = 0.5 * (a.double() @ b.double()) + (start.double() if accumulate else 0)
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_matmul_writes_the_output_dtype_rounded_once():
    from leanops.triton_kernels import gemm
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(40, 300, generator=generator).to(torch.float16).to(_device())
    b = torch.randn(300, 24, generator=generator).to(torch.float16).to(_device())
    out = torch.empty(40, 24, dtype=torch.float16, device=_device())
    gemm.matmul(a, b, out, torch.ones(1, device=_device()), splits=1)
    exact = a.double() @ b.double()
    # float32 accumulation, one rounding to float16: within a unit of float16 rounding of the exact result (the
    # float32 sum's own error is far smaller).
    assert ((out.double() - exact).abs() <= exact.abs() * 2.0**-10 + 1e-6).all()


def test_empty_shapes_leave_the_output_alone():
    from leanops.triton_kernels import gemm
    out = torch.ones(3, 0, device=_device())
    gemm.matmul(torch.ones(3, 5, device=_device()), torch.ones(5, 0, device=_device()), out,
                torch.ones(1, device=_device()))
    assert out.shape == (3, 0)
