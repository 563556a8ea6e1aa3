"""The CUDA kernels of the chunked linear cross-entropy primitives (csrc/cuda/cross_entropy.cu), called directly
through torch.ops.leanops (linear_ce_forward, linear_ce_backward), against the chunked plain-PyTorch primitives of
leanops.reference.cross_entropy run in float64 on the same inputs, upcast (bfloat16 and float16 values are exact in
float64).

Tolerance. The largest error of each output, relative to the largest magnitude of its expected value, must be at
most:
- statistics (lse, target_logit, logit_sum, logit_square_sum; float32 for every input dtype, accumulated in
  float32, 16-bit products exact): 2e-5;
- gradients (grad_hidden, grad_weight, grad_bias; in the input dtype): 2e-5 for float32; for bfloat16 and float16
  4 units of the dtype's rounding (4 * 2^-8, 4 * 2^-11): the one rounding of the float32 result, plus room;
or twice the error of the same reference primitives run in plain float32 PyTorch (on the CPU: no TF32) where that
is larger. That is the flash-attention rule, and it only binds for ill-conditioned inputs: with logits around 1e3, one
float32 rounding of z moves exp(z - lse) by about 1e-4.

Sizes (N, V, D): N = 1, V = 1, D = 1 each against moderate others, (37, 300, 70), (300, 1000, 520) (several token
and vocabulary tiles, two column chunks in the backward kernels) and (65, 130, 1096) (three column chunks). None of
N, V is a multiple of the kernels' 64-row tiles; D = 520 and 1096 are multiples of 8 (16-bit features take the
cp.async path), 70 and 1 are not (the scalar path; a misaligned copy must give bitwise the same results).
"""
import pytest
import torch

import leanops  # noqa: F401  (loads leanops._C, which registers the ops)
from leanops import _extension
from leanops.reference import cross_entropy as reference

OPERATORS = ("linear_ce_forward", "linear_ce_backward")


def _cuda_kernels_registered() -> bool:
    if not _extension.cuda_kernels_built() or not hasattr(torch.ops.leanops, "linear_ce_forward"):
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"leanops::{name}", "CUDA") for name in OPERATORS)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _cuda_kernels_registered(),
                       reason="leanops._C was built without the CUDA cross-entropy kernels"),
]

ops = torch.ops.leanops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 300, 70), (37, 1, 70), (37, 300, 1), (37, 300, 70), (300, 1000, 520), (65, 130, 1096)]
STATISTIC_TOLERANCE = 2e-5
GRADIENT_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11}
# The flash-attention rule: the kernels may err up to this many times plain float32 PyTorch.
BASELINE_FACTOR = 2.0

FORWARD_OUTPUTS = ("lse", "target_logit", "logit_sum", "logit_square_sum")
BACKWARD_OUTPUTS = ("grad_hidden", "grad_weight", "grad_bias")


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------------
# Inputs.

def _forward_inputs(tokens, vocabulary, dim, dtype, seed, *, with_bias=True, softcap=0.0, magnitude=3.0,
                    hidden_scale=1.0, weight_scale=1.0):
    """(hidden, weight, bias, targets, softcap) on the GPU. Logits z = h W^T + b have a spread of about
    `magnitude` (times hidden_scale * weight_scale, the factors h and W are multiplied by); every fifth token has no
    target (-1), token 1 targets the last vocabulary entry."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=generator, dtype=torch.float64) * (magnitude / max(dim, 1) ** 0.5)
    weight = torch.randn(vocabulary, dim, generator=generator, dtype=torch.float64)
    bias = (0.5 * torch.randn(vocabulary, generator=generator, dtype=torch.float64) if with_bias
            else torch.empty(0, dtype=torch.float64))
    targets = torch.randint(0, vocabulary, (tokens,), generator=generator)
    targets[::5] = -1
    if tokens > 1:
        targets[1] = vocabulary - 1
    hidden, weight = hidden * hidden_scale, weight * weight_scale
    return (hidden.to(dtype).cuda(), weight.to(dtype).cuda(), bias.to(dtype).cuda(), targets.cuda(), softcap)


def _statistic_gradients(tokens, seed, scale=1.0):
    """(grad_lse, grad_target, grad_sum, grad_square_sum), float32 on the GPU: signed, nonzero, of the sizes a mean
    cross-entropy with label smoothing, z-loss and squentropy would give (times `scale`)."""
    generator = torch.Generator().manual_seed(seed)
    grad_lse = (0.5 + torch.rand(tokens, generator=generator)) / max(tokens, 1)
    grad_target = -grad_lse * (0.5 + torch.rand(tokens, generator=generator))
    grad_sum = 0.1 * torch.randn(tokens, generator=generator) / max(tokens, 1)
    grad_square_sum = 0.01 * torch.randn(tokens, generator=generator) / max(tokens, 1)
    return tuple((scale * t).float().cuda() for t in (grad_lse, grad_target, grad_sum, grad_square_sum))


def _backward_inputs(forward_arguments, seed, scale=1.0):
    """The arguments of linear_ce_backward, with lse from the float64 reference rounded to float32."""
    lse = reference.linear_ce_forward(*_converted(forward_arguments))[0].float().cuda()
    return tuple(forward_arguments) + (lse,) + _statistic_gradients(forward_arguments[0].shape[0], seed, scale)


# ---------------------------------------------------------------------------------------------------------------
# Checks.

def _converted(arguments, precision=torch.float64, device="cpu"):
    """Floating-point tensors converted to `precision` on `device`; integer tensors (targets) moved only; other
    arguments (softcap) as they are."""
    converted = []
    for a in arguments:
        if isinstance(a, torch.Tensor):
            a = a.detach().to(device=device, dtype=precision) if a.is_floating_point() else a.detach().to(device)
        converted.append(a)
    return tuple(converted)


def _check(names, actual, arguments, reference_fn, expected_dtypes, tolerances, only=None):
    """Each kernel output against reference_fn(arguments) in float64, with the tolerance of the module docstring.
    `only`: the names of the outputs to compare (the others are checked for dtype, shape and finiteness)."""
    actual = tuple(actual)
    expected = tuple(reference_fn(*_converted(arguments, torch.float64)))
    baseline = tuple(reference_fn(*_converted(arguments, torch.float32)))
    assert len(actual) == len(expected) == len(names)
    for name, kernel, oracle, plain, dtype, base_tolerance in zip(names, actual, expected, baseline,
                                                                  expected_dtypes, tolerances):
        assert kernel.dtype == dtype, f"{name}: dtype {kernel.dtype}, expected {dtype}"
        assert kernel.device == arguments[0].device, f"{name}: on {kernel.device}, not {arguments[0].device}"
        assert kernel.shape == oracle.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(oracle.shape)}"
        kernel = kernel.double().cpu()
        oracle = oracle.double().cpu()
        assert bool(torch.isfinite(kernel).all()), f"{name}: non-finite values in the result"
        if oracle.numel() == 0 or (only is not None and name not in only):
            continue
        size = max(oracle.abs().max().item(), 1e-30)
        error = (kernel - oracle).abs().max().item() / size
        baseline_error = (plain.double().cpu() - oracle).abs().max().item() / size
        tolerance = max(base_tolerance, BASELINE_FACTOR * baseline_error)
        assert error <= tolerance, (f"{name}: relative error {error:.3g} > tolerance {tolerance:.3g} "
                                    f"(plain float32 PyTorch: {baseline_error:.3g}; relative to {size:.4g})")


def _check_forward(arguments):
    _check(FORWARD_OUTPUTS, ops.linear_ce_forward(*arguments), arguments, reference.linear_ce_forward,
           (torch.float32,) * 4, (STATISTIC_TOLERANCE,) * 4)


def _check_backward(arguments, only=None):
    dtype = arguments[0].dtype
    _check(BACKWARD_OUTPUTS, ops.linear_ce_backward(*arguments), arguments, reference.linear_ce_backward,
           (dtype,) * 3, (GRADIENT_TOLERANCE[dtype],) * 3, only)


# ---------------------------------------------------------------------------------------------------------------
# Accuracy.

@pytest.mark.parametrize("softcap", [0.0, 4.0], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_forward(dtype, shape, with_bias, softcap):
    arguments = _forward_inputs(*shape, dtype, seed=sum(shape) + 7 * with_bias, with_bias=with_bias,
                                softcap=softcap)
    _check_forward(arguments)


@pytest.mark.parametrize("softcap", [0.0, 4.0], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_backward(dtype, shape, with_bias, softcap):
    seed = sum(shape) + 7 * with_bias + 1
    arguments = _backward_inputs(_forward_inputs(*shape, dtype, seed=seed, with_bias=with_bias, softcap=softcap),
                                 seed=seed + 1)
    _check_backward(arguments)


@pytest.mark.parametrize("softcap", [0.0, 30.0], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("shape", [(37, 300, 70), (300, 1000, 520)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_large_logits(dtype, shape, softcap):
    """Logits around 1e3, far beyond exp's float32 range: the running maxima keep every statistic and gradient
    finite (and, with a softcap of 30, dz'/dz is tiny almost everywhere)."""
    arguments = _forward_inputs(*shape, dtype, seed=11 + shape[0], softcap=softcap, magnitude=300.0)
    hidden, weight = arguments[0].double(), arguments[1].double()
    assert (hidden @ weight.T).abs().max().item() > 500
    _check_forward(arguments)
    _check_backward(_backward_inputs(arguments, seed=12 + shape[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_gradients_outside_float16_range(dtype):
    """|G| up to ~1e6, past float16's 65504, with small features so that the gradients themselves stay in range (no
    bias: its gradient sum_n G would not): float16 G is scaled by a power of two per tile before the tensor cores."""
    arguments = _forward_inputs(37, 300, 70, dtype, seed=13, with_bias=False, hidden_scale=1e-3,
                                weight_scale=1e-3)
    backward_arguments = _backward_inputs(arguments, seed=14, scale=2e5 * 37)
    assert reference.linear_ce_backward(*_converted(backward_arguments))[0].abs().max().item() < 3e4
    _check_backward(backward_arguments)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_gradients_below_float16_range(dtype):
    """|G| <= ~2e-7, most entries far below float16's smallest subnormal (6e-8), with a large weight so that
    grad_hidden = G W is a normal float16 (grad_weight = G^T h and grad_bias underflow in float16 and are only
    checked to be finite)."""
    arguments = _forward_inputs(37, 300, 70, dtype, seed=15, hidden_scale=1e-3, weight_scale=1e3)
    backward_arguments = _backward_inputs(arguments, seed=16, scale=1e-7 * 37)
    assert reference.linear_ce_backward(*_converted(backward_arguments))[0].abs().max().item() > 1e-4
    _check_backward(backward_arguments, only=("grad_hidden",))


def test_targets_at_the_vocabulary_edges():
    """Targets 0, V - 1 and -1 only, V one past a tile boundary (the last tile has a single valid entry)."""
    tokens, vocabulary, dim = 37, 65, 40
    arguments = list(_forward_inputs(tokens, vocabulary, dim, torch.float32, seed=17))
    targets = torch.tensor([0, vocabulary - 1, -1] * (tokens // 3 + 1))[:tokens]
    arguments[3] = targets.cuda()
    _check_forward(tuple(arguments))
    _check_backward(_backward_inputs(tuple(arguments), seed=18))


# ---------------------------------------------------------------------------------------------------------------
# Layouts, determinism, streams, edge cases, argument checks.

def _both_ops(arguments):
    forward = tuple(ops.linear_ce_forward(*arguments[:5]))
    return forward + tuple(ops.linear_ce_backward(*arguments))


def _misaligned(t):
    """A contiguous copy of t whose data pointer is off the 16-byte grid: the kernels take their scalar loads."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def _strided(t):
    """A non-contiguous view holding the values of t (every other element of a wider tensor)."""
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_layouts_give_bitwise_identical_results(dtype):
    """Misaligned features (scalar instead of 16-byte loads) and non-contiguous inputs (copied) change nothing."""
    arguments = _backward_inputs(_forward_inputs(130, 300, 520, dtype, seed=19, softcap=10.0), seed=20)
    expected = _both_ops(arguments)
    misaligned = list(arguments)
    misaligned[0], misaligned[1] = _misaligned(arguments[0]), _misaligned(arguments[1])
    strided = [_strided(a) if isinstance(a, torch.Tensor) and a.numel() > 0 else a for a in arguments]
    for name, variant in (("misaligned", misaligned), ("strided", strided)):
        for index, (a, b) in enumerate(zip(_both_ops(variant), expected)):
            assert torch.equal(a, b), f"{name} inputs: output {index} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_bitwise_reproducible_and_on_the_current_stream(dtype):
    """No atomics: repeated calls agree bitwise, also when launched on a side stream."""
    arguments = _backward_inputs(_forward_inputs(300, 1000, 520, dtype, seed=21), seed=22)
    first = _both_ops(arguments)
    second = _both_ops(arguments)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        third = _both_ops(arguments)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for index, (a, b, c) in enumerate(zip(first, second, third)):
        assert torch.equal(a, b) and torch.equal(a, c), f"output {index} differs between calls"


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_no_tokens(with_bias):
    """N = 0: empty statistics and grad_hidden; grad_weight and grad_bias are 0 (an empty sum)."""
    arguments = _backward_inputs(_forward_inputs(0, 70, 24, torch.bfloat16, seed=23, with_bias=with_bias), seed=24)
    outputs = _both_ops(arguments)
    assert [tuple(t.shape) for t in outputs] == [(0,)] * 4 + [(0, 24), (70, 24), ((70,) if with_bias else (0,))]
    assert all(t.is_cuda for t in outputs)
    assert [t.dtype for t in outputs] == [torch.float32] * 4 + [torch.bfloat16] * 3
    assert not outputs[5].any() and not outputs[6].any()


def test_zero_feature_dimension():
    """D = 0: z = b everywhere."""
    arguments = _forward_inputs(37, 100, 0, torch.float32, seed=25, softcap=2.0)
    _check_forward(arguments)
    _check_backward(_backward_inputs(arguments, seed=26))


def test_invalid_arguments_name_the_argument():
    hidden, weight, bias, targets, softcap = _forward_inputs(37, 100, 8, torch.float32, seed=27)
    with pytest.raises(TypeError, match="'weight'"):
        ops.linear_ce_forward(hidden, weight.half(), bias, targets, softcap)
    with pytest.raises(ValueError, match="'targets'"):
        ops.linear_ce_forward(hidden, weight, bias, targets.cpu(), softcap)
    with pytest.raises(ValueError, match="'bias'"):
        ops.linear_ce_forward(hidden, weight, bias[:3], targets, softcap)
    with pytest.raises(TypeError, match="'targets'"):
        ops.linear_ce_forward(hidden, weight, bias, targets.int(), softcap)
    lse = ops.linear_ce_forward(hidden, weight, bias, targets, softcap)[0]
    grads = _statistic_gradients(37, seed=28)
    with pytest.raises(TypeError, match="'lse'"):
        ops.linear_ce_backward(hidden, weight, bias, targets, softcap, lse.half(), *grads)
    with pytest.raises(ValueError, match="'grad_sum'"):
        ops.linear_ce_backward(hidden, weight, bias, targets, softcap, lse, grads[0], grads[1], grads[2][:3],
                               grads[3])
