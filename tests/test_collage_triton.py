"""The Triton kernel of Collage AdamW's fused multi-tensor step (triton_kernels/collage.py) gives the reference's
bits (python/leanops/reference/collage.py) for every state tensor, step after step, and its telemetry to within
float64 summation order.

On a machine without a GPU the kernel runs on CPU tensors under Triton's interpreter; with CUDA, on CUDA tensors
(the reference then runs on the same CUDA tensors' copies)."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from leanops.reference import collage as reference  # noqa: E402
from leanops.triton_kernels import collage as kernels  # noqa: E402

def _reference_step(*arguments) -> None:
    reference.collage_adamw_step_(*arguments)


STATES = ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "exp_avg_sqs_lo")
AWKWARD_SIZES = [1, 3, 1000, 4097]


def _device_param(device: str):
    if device == "cpu":
        # CPU tensors run only under the interpreter (a machine without CUDA: tests/conftest.py sets it).
        skip = not kernels._interpreted()
        reason = "CPU tensors need TRITON_INTERPRET=1"
    else:
        skip = not torch.cuda.is_available() or kernels._interpreted()
        reason = "needs a CUDA device (and no interpreter)"
    return pytest.param(device, marks=pytest.mark.skipif(skip, reason=reason), id=device)


DEVICES = [_device_param("cpu"), _device_param("cuda")]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
MODES = [pytest.param(False, id="light"), pytest.param(True, id="plus")]


def _spread(shape, generator, low: int, high: int, positive: bool = False) -> torch.Tensor:
    """Normal values scaled by 10^u, u uniform in [low, high]: many binades."""
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    values = values * torch.pow(10.0, torch.empty(shape, dtype=torch.float64).uniform_(low, high,
                                                                                         generator=generator))
    return values.abs() if positive else values


def _pair(values: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised MCF pair (hi, lo) of the storage format from float64 values."""
    hi = values.to(dtype)
    return hi, (values - hi.double()).to(dtype)


# Exponent ranges (powers of ten) of the first moments and the grads: wide, yet inside each format's range, so
# that no state overflows (float16) and the data stays free of infinities and NaNs.
MOMENT_EXPONENTS = {torch.bfloat16: (-5, -1), torch.float16: (-3, -1)}
GRAD_EXPONENTS = {torch.bfloat16: (-5, 0), torch.float16: (-3, 0)}


def _states(sizes, dtype, plus: bool, seed: int, device, param_scale: float = 1.0) -> dict:
    """Parameters as MCF pairs; moments as Adam keeps them, v >= m^2."""
    generator = torch.Generator().manual_seed(seed)
    states = {name: [] for name in STATES}
    for n in sizes:
        theta, theta_lo = _pair(torch.randn(n, generator=generator, dtype=torch.float64) * param_scale, dtype)
        m = _spread(n, generator, *MOMENT_EXPONENTS[dtype])
        v, v_lo = _pair((m.abs() * _spread(n, generator, 0, 1, positive=True).clamp_min(1.0)).square(), dtype)
        states["params"].append(theta)
        states["params_lo"].append(theta_lo)
        states["exp_avgs"].append(m.to(dtype))
        states["exp_avg_sqs"].append(v)
        if plus:
            states["exp_avg_sqs_lo"].append(v_lo)
    return {name: [tensor.to(device) for tensor in tensors] for name, tensors in states.items()}


def _grads(sizes, dtype, generator, device) -> list[torch.Tensor]:
    return [_spread(n, generator, *GRAD_EXPONENTS[dtype]).to(dtype).to(device) for n in sizes]


def _clone(states: dict) -> dict:
    return {name: [tensor.clone() for tensor in tensors] for name, tensors in states.items()}


def _assert_same_bits(expected: dict, actual: dict, context: str) -> None:
    for name in STATES:
        for index, (want, got) in enumerate(zip(expected[name], actual[name])):
            want_bits, got_bits = want.view(torch.int16), got.view(torch.int16)
            differ = (want_bits != got_bits).nonzero().flatten()
            assert differ.numel() == 0, (f"{context}: {name}[{index}] differs at {differ.numel()} of {want.numel()} "
                                         f"elements, first {differ[:4].tolist()}: reference "
                                         f"{want[differ[:4]].tolist()}, triton {got[differ[:4]].tolist()}")


def _assert_metrics_close(expected: torch.Tensor, actual: torch.Tensor, context: str) -> None:
    torch.testing.assert_close(actual[:2], expected[:2], rtol=1e-5, atol=0.0, msg=context)
    assert actual[2:].tolist() == expected[2:].tolist(), f"{context}: counts {actual[2:]} vs {expected[2:]}"


def _run_steps(sizes, dtype, plus, device, *, steps=5, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.0, seed=0, param_scale=1.0):
    """`steps` steps of the reference and of the kernel from the same states with the same fresh grads."""
    expected = _states(sizes, dtype, plus, seed, device, param_scale)
    actual = _clone(expected)
    expected_metrics = torch.zeros(4, dtype=torch.float64, device=device)
    actual_metrics = torch.zeros(4, dtype=torch.float64, device=device)
    generator = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        grads = _grads(sizes, dtype, generator, device)
        arguments = (grads, lr, beta1, beta2, eps, weight_decay, 1.0 - beta1 ** step, 1.0 - beta2 ** step, plus)
        _reference_step(*expected.values(), *arguments, expected_metrics)
        kernels.collage_adamw_step_(*actual.values(), *arguments, actual_metrics)
        context = f"{dtype} plus={plus} wd={weight_decay} lr={lr} step {step}"
        _assert_same_bits(expected, actual, context)
        _assert_metrics_close(expected_metrics, actual_metrics, context)
    return actual, actual_metrics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plus", MODES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_wd", "wd"])
def test_steps_match_reference_bits(device, dtype, plus, weight_decay):
    _, metrics = _run_steps(AWKWARD_SIZES, dtype, plus, device, weight_decay=weight_decay)
    assert metrics[3].item() == 5 * sum(AWKWARD_SIZES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plus", MODES)
def test_many_tensors_and_several_chunks(device, plus):
    """Many rows (several levels of binary search), tensors spanning several chunks (20000 > 2 x 8192, the
    interpreter's block; 4099 > 2 x 2048, the GPU's), zero-size tensors among them."""
    sizes = [7, 0, 1, 20000, 2048, 2049, 0, 513, 1, 4099, 37, 3]
    _run_steps(sizes, torch.bfloat16, plus, device, steps=2, weight_decay=0.01, seed=3)


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_tensors(device):
    """Contiguous views at odd offsets: the kernel drops its alignment hint (no 16-byte vectors) and stays exact."""
    dtype, sizes = torch.bfloat16, [1000, 4097]
    expected = _states(sizes, dtype, True, 5, device)
    actual = {}
    for name, tensors in expected.items():
        views = []
        for tensor in tensors:
            buffer = torch.empty(tensor.numel() + 1, dtype=dtype, device=device)
            view = buffer[1:]
            view.copy_(tensor)
            views.append(view)
        actual[name] = views
    assert actual["params"][0].data_ptr() % 16 != 0
    generator = torch.Generator().manual_seed(6)
    expected_metrics = torch.zeros(4, dtype=torch.float64, device=device)
    actual_metrics = torch.zeros(4, dtype=torch.float64, device=device)
    for step in (1, 2):
        grads = _grads(sizes, dtype, generator, device)
        arguments = (grads, 1e-3, 0.9, 0.999, 1e-8, 0.1, 1.0 - 0.9 ** step, 1.0 - 0.999 ** step, True)
        _reference_step(*expected.values(), *arguments, expected_metrics)
        kernels.collage_adamw_step_(*actual.values(), *arguments, actual_metrics)
        _assert_same_bits(expected, actual, f"unaligned step {step}")
        _assert_metrics_close(expected_metrics, actual_metrics, f"unaligned step {step}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_updates_are_compensated(device, dtype):
    """lr = 1e-6 on parameters of a typical initialisation (std 0.02): a plain 16-bit update of that size is lost
    for most elements, the pair keeps nearly all of it (EDQ close to 1), bit for bit as the reference."""
    sizes = [4097, 1000]
    states, metrics = _run_steps(sizes, dtype, True, device, steps=3, lr=1e-6, weight_decay=0.1, seed=7,
                                 param_scale=0.02)
    edq = (metrics[0] / metrics[1]).item()
    assert edq > 0.9, f"EDQ {edq}"
    theta = torch.cat(states["params"]).cpu()
    plain_lost = ((theta.float() + 1e-6).to(dtype) == theta).double().mean().item()
    assert plain_lost > 0.8, f"a plain {dtype} update of 1e-6 is lost for only {plain_lost:.0%} of the elements"


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists(device):
    metrics = torch.zeros(4, dtype=torch.float64, device=device)
    kernels.collage_adamw_step_([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, True, metrics)
    kernels.collage_adamw_step_([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, False, None)
    empty = [torch.empty(0, dtype=torch.bfloat16, device=device)]
    kernels.collage_adamw_step_(empty, empty, empty, empty, [], empty, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001,
                                False, metrics)
    assert metrics.tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_without_metrics_and_through_the_custom_op(device):
    """metrics=None compiles the kernel without telemetry; torch.ops.leanops_triton gives the same bits."""
    import leanops.custom_ops.collage  # noqa: F401  (registers the operators)

    sizes, dtype = [3, 4097], torch.float16
    expected = _states(sizes, dtype, True, 11, device)
    no_metrics, through_op = _clone(expected), _clone(expected)
    grads = _grads(sizes, dtype, torch.Generator().manual_seed(12), device)
    arguments = (grads, 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.1, 0.05, True)
    _reference_step(*expected.values(), *arguments, None)
    kernels.collage_adamw_step_(*no_metrics.values(), *arguments, None)
    torch.ops.leanops_triton.collage_adamw_step_(*through_op.values(), *arguments, None)
    _assert_same_bits(expected, no_metrics, "metrics=None")
    _assert_same_bits(expected, through_op, "custom op")


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_bad_inputs(device):
    states = _states([8], torch.bfloat16, False, 13, device)
    grads = [torch.zeros(8, dtype=torch.bfloat16, device=device)]
    arguments = (1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, False, None)
    strided = torch.zeros(16, dtype=torch.bfloat16, device=device)[::2]
    with pytest.raises(AssertionError, match="contiguous"):
        kernels.collage_adamw_step_(*states.values(), [strided], *arguments)
    with pytest.raises(ValueError, match="float16"):
        as_float = {name: [tensor.float() for tensor in tensors] for name, tensors in states.items()}
        kernels.collage_adamw_step_(*as_float.values(), [grads[0].float()], *arguments)
    with pytest.raises(ValueError, match="grads"):
        kernels.collage_adamw_step_(*states.values(), [grads[0].half()], *arguments)
