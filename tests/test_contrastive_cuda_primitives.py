"""The CUDA kernels of the blockwise contrastive primitives (csrc/cuda/contrastive.cu), called directly through
torch.ops.leanops (clip_forward, clip_backward, siglip_forward, siglip_backward), against the blockwise plain-PyTorch
primitives of leanops.reference.contrastive run in float64 on the same inputs, upcast (bfloat16 and float16 values
are exact in float64).

Tolerance. Every output is float32 and accumulates in float32 whatever the feature dtype (16-bit products are exact
in float32). The largest error, relative to the largest magnitude of the expected output, must be at most 1e-5 for
float32 features and 1e-4 for bfloat16 / float16 ones, or twice the error of the same reference primitives run in
plain float32 PyTorch (on the CPU: no TF32) where that is larger. That is the flash-attention rule, and it only binds
for ill-conditioned inputs: with scale 100 and unnormalised features the logits reach 1e5, and one float32 rounding
of S moves exp(logit - lse) by percents. SigLIP's two scalar gradients are signed sums that may cancel, so their
errors are measured relative to sum |D S| and sum |D|, the size of their terms.

Sizes: B in {1, 2, 37, 130, 1000} and D in {1, 3, 70, 512}. No B is a multiple of the kernels' 64-row tile; only
D = 512 is a multiple of their 32-dimension chunk and of the 16-byte vector (the vector-load path; a misaligned copy
takes the scalar path and must give bitwise the same results). One test takes a batch large enough that each CTA of
clip_forward owns several row blocks.
"""
import pytest
import torch

import leanops  # noqa: F401  (loads leanops._C, which registers the ops)
from leanops import _extension
from leanops.reference import contrastive as reference

OPERATORS = ("clip_forward", "clip_backward", "siglip_forward", "siglip_backward")


def _cuda_kernels_registered() -> bool:
    if not _extension.cuda_kernels_built() or not hasattr(torch.ops.leanops, "clip_forward"):
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"leanops::{name}", "CUDA") for name in OPERATORS)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _cuda_kernels_registered(),
                       reason="leanops._C was built without the CUDA contrastive kernels"),
]

ops = torch.ops.leanops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BATCHES = [1, 2, 37, 130, 1000]
DIMS = [1, 3, 70, 512]
BASE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# The flash-attention rule: the kernels may err up to this many times plain float32 PyTorch.
BASELINE_FACTOR = 2.0

CLIP_FORWARD_OUTPUTS = ("row_lse", "col_lse")
CLIP_BACKWARD_OUTPUTS = ("grad_image", "grad_text", "grad_scale")
SIGLIP_FORWARD_OUTPUTS = ("row_loss",)
SIGLIP_BACKWARD_OUTPUTS = ("grad_image", "grad_text", "grad_scale", "grad_bias")


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------------
# Inputs.

def _features(batch, dim, dtype, generator, magnitude=1.0):
    """(image, text) on the GPU: matching rows correlated (as after training), row norms around `magnitude`,
    unnormalised (norms vary from row to row)."""
    image = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    text = image + 0.5 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    factor = magnitude / max(dim, 1) ** 0.5
    return (image * factor).to(dtype).cuda(), (text * factor).to(dtype).cuda()


def _clip_inputs(batch, dim, dtype, seed, magnitude=1.0, max_scale=100.0):
    """(image, text, scale): per-anchor scales in [1, max_scale], the first one at max_scale."""
    generator = torch.Generator().manual_seed(seed)
    image, text = _features(batch, dim, dtype, generator, magnitude)
    scale = 1.0 + (max_scale - 1.0) * torch.rand(batch, generator=generator, dtype=torch.float64)
    if batch > 0:
        scale[0] = max_scale
    return image, text, scale.float().cuda()


def _weights(batch, seed):
    """Signed per-anchor weights (any upstream gradient), the last one zero."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(batch, generator=generator)
    if batch > 1:
        weight[-1] = 0.0
    return weight.cuda()


def _clip_backward_inputs(batch, dim, dtype, seed, magnitude=1.0, max_scale=100.0, weights=None):
    """The arguments of clip_backward, with row_lse / col_lse from the float64 reference rounded to float32."""
    image, text, scale = _clip_inputs(batch, dim, dtype, seed, magnitude, max_scale)
    row_lse, col_lse = (t.float().cuda() for t in reference.clip_forward(*_converted((image, text, scale))))
    if weights is None:
        weights = (_weights(batch, seed + 1), _weights(batch, seed + 2))
    return (image, text, scale, row_lse, col_lse) + tuple(weights)


def _siglip_inputs(batch, dim, dtype, seed, magnitude=1.0, scale=10.0, bias=-10.0, groups=None):
    """(image, text, scale, bias, groups); by default repeated group ids, so rows have several positives."""
    generator = torch.Generator().manual_seed(seed)
    image, text = _features(batch, dim, dtype, generator, magnitude)
    if groups is None:
        groups = torch.randint(0, max(1, batch // 2), (batch,), generator=generator)
    scale = torch.tensor(scale, dtype=torch.float32)
    bias = torch.tensor(bias, dtype=torch.float32)
    return image, text, scale.cuda(), bias.cuda(), groups.cuda()


# ---------------------------------------------------------------------------------------------------------------
# Checks.

def _converted(arguments, precision=torch.float64, device="cpu"):
    """Floating-point tensors converted to `precision` on `device`; integer tensors (group ids) moved only."""
    return tuple(t.detach().to(device=device, dtype=precision) if t.is_floating_point() else t.detach().to(device)
                 for t in arguments)


def _as_tuple(outputs):
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def _check(names, actual, arguments, reference_fn, dtype, magnitudes=None, expected_device="cpu"):
    """Each kernel output against reference_fn(arguments) in float64, with the tolerance of the module docstring.

    magnitudes: per output, the size the error is relative to (None: the largest |expected|).
    """
    actual = _as_tuple(actual)
    expected = _as_tuple(reference_fn(*_converted(arguments, torch.float64, expected_device)))
    baseline = _as_tuple(reference_fn(*_converted(arguments, torch.float32, "cpu")))
    magnitudes = magnitudes or (None,) * len(names)
    assert len(actual) == len(expected) == len(names)
    for name, kernel, oracle, plain, magnitude in zip(names, actual, expected, baseline, magnitudes):
        assert kernel.dtype == torch.float32, f"{name}: dtype {kernel.dtype}, expected torch.float32"
        assert kernel.device == arguments[0].device, f"{name}: on {kernel.device}, not {arguments[0].device}"
        assert kernel.shape == oracle.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(oracle.shape)}"
        kernel = kernel.double().cpu()
        oracle = oracle.double().cpu()
        assert bool(torch.isfinite(kernel).all()), f"{name}: non-finite values in the result"
        if oracle.numel() == 0:
            continue
        size = max(magnitude if magnitude is not None else oracle.abs().max().item(), 1e-30)
        error = (kernel - oracle).abs().max().item() / size
        baseline_error = (plain.double().cpu() - oracle).abs().max().item() / size
        tolerance = max(BASE_TOLERANCE[dtype], BASELINE_FACTOR * baseline_error)
        assert error <= tolerance, (f"{name}: relative error {error:.3g} > tolerance {tolerance:.3g} "
                                    f"(plain float32 PyTorch: {baseline_error:.3g}; relative to {size:.4g})")


def _siglip_scalar_magnitudes(image, text, scale, bias, groups, row_weight):
    """(sum |D S|, sum |D|) in float64: the size of the terms of grad_scale and grad_bias."""
    x, y, s, b, w = _converted((image, text, scale, bias, row_weight))
    g = groups.cpu()
    similarity = x @ y.T
    label = torch.where(g[:, None] == g[None, :], 1.0, -1.0).double()
    d = -w[:, None] * label * torch.sigmoid(-label * (s * similarity + b))
    return (d * similarity).abs().sum().item(), d.abs().sum().item()


def _check_siglip_backward(arguments, dtype, expected_device="cpu"):
    magnitudes = (None, None) + _siglip_scalar_magnitudes(*arguments)
    _check(SIGLIP_BACKWARD_OUTPUTS, ops.siglip_backward(*arguments), arguments, reference.siglip_backward, dtype,
           magnitudes, expected_device)


# ---------------------------------------------------------------------------------------------------------------
# CLIP.

@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_clip_forward(dtype, batch, dim):
    arguments = _clip_inputs(batch, dim, dtype, seed=batch * 1000 + dim)
    _check(CLIP_FORWARD_OUTPUTS, ops.clip_forward(*arguments), arguments, reference.clip_forward, dtype)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_clip_backward(dtype, batch, dim):
    arguments = _clip_backward_inputs(batch, dim, dtype, seed=batch * 1000 + dim + 1)
    _check(CLIP_BACKWARD_OUTPUTS, ops.clip_backward(*arguments), arguments, reference.clip_backward, dtype)


@pytest.mark.parametrize("batch,dim", [(130, 70), (1000, 512)])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_clip_large_logits(dtype, batch, dim):
    """|S| ~ 1e3 and scale 100: logits ~ 1e5, far beyond exp's float32 range; the running maxima keep it finite."""
    image, text, scale = _clip_inputs(batch, dim, dtype, seed=7 + batch, magnitude=30.0)
    scale.fill_(100.0)
    assert (image.double() @ text.double().T).abs().max().item() > 500
    arguments = (image, text, scale)
    _check(CLIP_FORWARD_OUTPUTS, ops.clip_forward(*arguments), arguments, reference.clip_forward, dtype)
    row_lse, col_lse = (t.float().cuda() for t in reference.clip_forward(*_converted(arguments)))
    weight = torch.full((batch,), 0.5 / batch, device="cuda")
    backward_arguments = (image, text, scale, row_lse, col_lse, weight, weight)
    _check(CLIP_BACKWARD_OUTPUTS, ops.clip_backward(*backward_arguments), backward_arguments,
           reference.clip_backward, dtype)


def test_clip_forward_several_row_blocks_per_cta():
    """A batch with more 64-row blocks than clip_forward launches CTAs (2 per multiprocessor): each CTA merges the
    column statistics of several row blocks in its workspace slot."""
    multiprocessors = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    batch, dim = 64 * (2 * multiprocessors + 5) + 17, 40
    arguments = _clip_inputs(batch, dim, torch.float32, seed=3, max_scale=20.0)
    _check(CLIP_FORWARD_OUTPUTS, ops.clip_forward(*arguments), arguments, reference.clip_forward, torch.float32,
           expected_device="cuda")
    image, text, scale = arguments
    row_lse, col_lse = (t.float() for t in reference.clip_forward(*_converted(arguments, device="cuda")))
    backward_arguments = (image, text, scale, row_lse, col_lse, _weights(batch, 4), _weights(batch, 5))
    _check(CLIP_BACKWARD_OUTPUTS, ops.clip_backward(*backward_arguments), backward_arguments,
           reference.clip_backward, torch.float32, expected_device="cuda")


# ---------------------------------------------------------------------------------------------------------------
# SigLIP.

@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_siglip_forward(dtype, batch, dim):
    arguments = _siglip_inputs(batch, dim, dtype, seed=batch * 1000 + dim + 2)
    _check(SIGLIP_FORWARD_OUTPUTS, ops.siglip_forward(*arguments), arguments, reference.siglip_forward, dtype)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_siglip_backward(dtype, batch, dim):
    arguments = _siglip_inputs(batch, dim, dtype, seed=batch * 1000 + dim + 3) + (_weights(batch, seed=4),)
    _check_siglip_backward(arguments, dtype)


@pytest.mark.parametrize("batch,dim", [(130, 70), (1000, 512)])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_siglip_large_logits(dtype, batch, dim):
    """|scale S + bias| ~ 1e5: softplus and sigmoid stay finite and accurate."""
    arguments = _siglip_inputs(batch, dim, dtype, seed=8 + batch, magnitude=30.0, scale=100.0, bias=-10.0)
    assert (arguments[0].double() @ arguments[1].double().T).abs().max().item() > 500
    _check(SIGLIP_FORWARD_OUTPUTS, ops.siglip_forward(*arguments), arguments, reference.siglip_forward, dtype)
    _check_siglip_backward(arguments + (torch.full((batch,), 1.0 / batch, device="cuda"),), dtype)


@pytest.mark.parametrize("kind", ["64-bit-ids", "all-equal", "all-distinct"])
def test_siglip_group_ids(kind):
    """Labels compare the full int64 ids: three groups whose ids share their low 32 bits (and are negative) stay
    three groups; every row positive with every column; only the diagonal positive."""
    batch, dim = 130, 70
    groups = {"64-bit-ids": (torch.arange(batch) % 3) * 2**32 - 5,
              "all-equal": torch.full((batch,), 7),
              "all-distinct": torch.arange(batch)}[kind]
    arguments = _siglip_inputs(batch, dim, torch.float32, seed=9, groups=groups)
    _check(SIGLIP_FORWARD_OUTPUTS, ops.siglip_forward(*arguments), arguments, reference.siglip_forward,
           torch.float32)
    _check_siglip_backward(arguments + (_weights(batch, seed=10),), torch.float32)


def test_siglip_forward_separated_pairs():
    """Every pair far on its correct side: each softplus term is tiny (exp(-20) or less) and must not round to 0."""
    batch, dim = 5, 3
    image = torch.eye(batch, dim) * 4.0
    image[3:] = torch.tensor([[0.0, 0.0, -4.0], [-4.0, 0.0, 0.0]])
    arguments = (image.cuda(), image.clone().cuda(), torch.tensor(3.0).cuda(), torch.tensor(-20.0).cuda(),
                 torch.arange(batch).cuda())
    expected = reference.siglip_forward(*_converted(arguments))
    actual = ops.siglip_forward(*arguments)
    assert bool((expected > 0).all()) and bool((expected < 1e-6).all())
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Layouts, determinism, streams, edge cases, argument checks.

def _all_ops(image, text, clip_scale, row_lse, col_lse, row_weight, col_weight, siglip_scale, bias, groups):
    return (_as_tuple(ops.clip_forward(image, text, clip_scale))
            + _as_tuple(ops.clip_backward(image, text, clip_scale, row_lse, col_lse, row_weight, col_weight))
            + _as_tuple(ops.siglip_forward(image, text, siglip_scale, bias, groups))
            + _as_tuple(ops.siglip_backward(image, text, siglip_scale, bias, groups, row_weight)))


def _all_arguments(batch, dim, dtype, seed):
    image, text, clip_scale, row_lse, col_lse, row_weight, col_weight = _clip_backward_inputs(batch, dim, dtype, seed)
    _, _, siglip_scale, bias, groups = _siglip_inputs(batch, dim, dtype, seed)
    return [image, text, clip_scale, row_lse, col_lse, row_weight, col_weight, siglip_scale, bias, groups]


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
    batch, dim = 130, 512
    arguments = _all_arguments(batch, dim, dtype, seed=11)
    expected = _all_ops(*arguments)
    misaligned = list(arguments)
    misaligned[0], misaligned[1] = _misaligned(arguments[0]), _misaligned(arguments[1])
    strided = [_strided(t) if t.dim() >= 1 else t for t in arguments]
    for name, variant in (("misaligned", misaligned), ("strided", strided)):
        for index, (a, b) in enumerate(zip(_all_ops(*variant), expected)):
            assert torch.equal(a, b), f"{name} inputs: output {index} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_bitwise_reproducible_and_on_the_current_stream(dtype):
    """No atomics: repeated calls agree bitwise, also when launched on a side stream."""
    arguments = _all_arguments(1000, 70, dtype, seed=12)
    first = _all_ops(*arguments)
    second = _all_ops(*arguments)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        third = _all_ops(*arguments)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for index, (a, b, c) in enumerate(zip(first, second, third)):
        assert torch.equal(a, b) and torch.equal(a, c), f"output {index} differs between calls"


def test_empty_batch():
    outputs = _all_ops(*_all_arguments(0, 8, torch.float32, seed=13))
    expected_shapes = [(0,), (0,), (0, 8), (0, 8), (0,), (0,), (0, 8), (0, 8), (), ()]
    assert [tuple(t.shape) for t in outputs] == expected_shapes
    assert all(t.dtype == torch.float32 and t.is_cuda for t in outputs)
    assert outputs[-2].item() == 0.0 and outputs[-1].item() == 0.0


def test_zero_feature_dimension():
    """D = 0: S = 0 everywhere."""
    batch = 37
    arguments = _clip_inputs(batch, 0, torch.float32, seed=14)
    _check(CLIP_FORWARD_OUTPUTS, ops.clip_forward(*arguments), arguments, reference.clip_forward, torch.float32)
    backward_arguments = _clip_backward_inputs(batch, 0, torch.float32, seed=14)
    _check(CLIP_BACKWARD_OUTPUTS, ops.clip_backward(*backward_arguments), backward_arguments,
           reference.clip_backward, torch.float32)
    siglip_arguments = _siglip_inputs(batch, 0, torch.float32, seed=14)
    _check(SIGLIP_FORWARD_OUTPUTS, ops.siglip_forward(*siglip_arguments), siglip_arguments,
           reference.siglip_forward, torch.float32)
    _check_siglip_backward(siglip_arguments + (_weights(batch, seed=15),), torch.float32)


def test_invalid_arguments_name_the_argument():
    image, text, scale = _clip_inputs(37, 8, torch.float32, seed=16)
    with pytest.raises(TypeError, match="'image'"):
        ops.clip_forward(image.double(), text.double(), scale)
    with pytest.raises(TypeError, match="'text'"):
        ops.clip_forward(image, text.half(), scale)
    with pytest.raises(ValueError, match="'text'"):
        ops.clip_forward(image, text[:36], scale)
    with pytest.raises(ValueError, match="'image'"):
        ops.clip_forward(image[0], text[0], scale)
    with pytest.raises(ValueError, match="'scale'"):
        ops.clip_forward(image, text, scale[:5])
    with pytest.raises(ValueError, match="'scale'"):
        ops.clip_forward(image, text, scale.cpu())
    with pytest.raises(TypeError, match="'scale'"):
        ops.clip_forward(image, text, scale.double())
    row_lse, col_lse = ops.clip_forward(image, text, scale)
    weight = torch.ones(37, device="cuda")
    with pytest.raises(ValueError, match="'col_weight'"):
        ops.clip_backward(image, text, scale, row_lse, col_lse, weight, weight[:3])
    with pytest.raises(TypeError, match="'row_lse'"):
        ops.clip_backward(image, text, scale, row_lse.half(), col_lse, weight, weight)
    _, _, siglip_scale, bias, groups = _siglip_inputs(37, 8, torch.float32, seed=17)
    with pytest.raises(TypeError, match="'groups'"):
        ops.siglip_forward(image, text, siglip_scale, bias, groups.int())
    with pytest.raises(ValueError, match="'groups'"):
        ops.siglip_forward(image, text, siglip_scale, bias, groups[:3])
    with pytest.raises(ValueError, match="'scale'"):
        ops.siglip_forward(image, text, scale, bias, groups)
    with pytest.raises(TypeError, match="'bias'"):
        ops.siglip_forward(image, text, siglip_scale, bias.double(), groups)
    with pytest.raises(ValueError, match="'row_weight'"):
        ops.siglip_backward(image, text, siglip_scale, bias, groups, weight[:3])
