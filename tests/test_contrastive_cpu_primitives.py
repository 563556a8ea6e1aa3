"""The C++ CPU kernels of the blockwise contrastive primitives, called directly through torch.ops.leanops
(clip_forward, clip_backward, siglip_forward, siglip_backward; csrc/ops.cpp states their math), against float64
plain-PyTorch computations of the same formulas. Only these tests build the B x B similarity matrix.

Tolerance: every output is fp32 and accumulates in fp32 whatever the input dtype, so bf16/fp16 inputs are held to the
same bar as fp32 ones, against float64 computed from the same (upcast) values: the largest error, relative to the
largest magnitude of the expected tensor, must be at most 1e-5, or twice the error of the same formulas run in plain
fp32 PyTorch where that is larger (the flash-attention rule: at scale 100 with features of norm 10, the logits
scale * <x, y> reach 1e4, and the fp32 rounding of <x, y> alone moves the softmax weights by ~1e-4).
"""

import pytest
import torch
import torch.nn.functional as F

import leanops  # noqa: F401  (loads leanops._C, which registers the ops)
from leanops import backends

_UNAVAILABLE = backends.unavailable_reason("cpu", torch.device("cpu"))
if _UNAVAILABLE is not None:
    pytest.skip(f"the cpu backend is unavailable: {_UNAVAILABLE}", allow_module_level=True)

ops = torch.ops.leanops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, D): B = 1 and D = 1 edge cases, B below, at and far from multiples of the 256-row block, and D = 0.
SIZES = [(1, 1), (1, 70), (2, 3), (37, 1), (37, 70), (300, 3), (300, 70), (1000, 100)]


# ---------------------------------------------------------------------------------------------------------------
# Plain-PyTorch computations of the same formulas (run in float64 as the oracle, in float32 as the baseline).

def clip_reference(image, text, scale, row_weight, col_weight, dtype):
    x, y = image.to(dtype), text.to(dtype)
    scale, row_weight, col_weight = scale.to(dtype), row_weight.to(dtype), col_weight.to(dtype)
    similarity = x @ y.T
    row_logits = scale[:, None] * similarity
    col_logits = scale[None, :] * similarity
    row_lse = torch.logsumexp(row_logits, dim=1)
    col_lse = torch.logsumexp(col_logits, dim=0)
    p = torch.exp(row_logits - row_lse[:, None])
    q = torch.exp(col_logits - col_lse[None, :])
    weights = row_weight[:, None] * scale[:, None] * p + col_weight[None, :] * scale[None, :] * q
    grad_scale = row_weight * (p * similarity).sum(1) + col_weight * (q * similarity).sum(0)
    return {"row_lse": row_lse, "col_lse": col_lse, "grad_image": weights @ y, "grad_text": weights.T @ x,
            "grad_scale": grad_scale}


def siglip_reference(image, text, scale, bias, groups, row_weight, dtype):
    x, y = image.to(dtype), text.to(dtype)
    scale, bias, row_weight = scale.to(dtype), bias.to(dtype), row_weight.to(dtype)
    similarity = x @ y.T
    label = torch.where(groups[:, None] == groups[None, :], 1.0, -1.0).to(dtype)
    logits = scale * similarity + bias
    d = -row_weight[:, None] * label * torch.sigmoid(-label * logits)
    return {"row_loss": F.softplus(-label * logits).sum(1), "grad_image": scale * d @ y,
            "grad_text": scale * d.T @ x, "grad_scale": (d * similarity).sum(), "grad_bias": d.sum()}


def assert_close(what, actual, expected, baseline):
    """`actual` (the kernel's fp32) against `expected` (float64); `baseline` is plain fp32 PyTorch's result."""
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}, expected torch.float32"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values in the result"
    magnitude = expected.abs().max().clamp_min(1e-30) if expected.numel() else torch.tensor(1.0, dtype=torch.float64)
    error = float(((actual.double() - expected).abs().max() / magnitude)) if expected.numel() else 0.0
    baseline_error = float(((baseline.double() - expected).abs().max() / magnitude)) if expected.numel() else 0.0
    tolerance = max(1e-5, 2.0 * baseline_error)
    assert error <= tolerance, (f"{what}: relative error {error:.3g} > {tolerance:.3g} "
                                f"(plain fp32 PyTorch: {baseline_error:.3g})")


def make_features(batch, dim, dtype, generator, norm=None):
    """(image, text) in `dtype`; rows rescaled to `norm` when given (unnormalised features, large logits)."""
    features = []
    for _ in range(2):
        f = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
        if norm is not None and dim > 0:
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm
        features.append(f.to(dtype))
    return features


def per_anchor_scale(batch, generator, low, high):
    """Log-uniform per-anchor multipliers in [low, high]."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return torch.exp(torch.log(torch.tensor(low)) + u * (torch.log(torch.tensor(high)) - torch.log(torch.tensor(low)))
                     ).to(torch.float32)


def check_clip(image, text, scale, row_weight, col_weight):
    row_lse, col_lse = ops.clip_forward(image, text, scale)
    grad_image, grad_text, grad_scale = ops.clip_backward(image, text, scale, row_lse, col_lse, row_weight,
                                                          col_weight)
    expected = clip_reference(image, text, scale, row_weight, col_weight, torch.float64)
    baseline = clip_reference(image, text, scale, row_weight, col_weight, torch.float32)
    actual = {"row_lse": row_lse, "col_lse": col_lse, "grad_image": grad_image, "grad_text": grad_text,
              "grad_scale": grad_scale}
    for name in actual:
        assert_close(name, actual[name], expected[name], baseline[name])


def check_siglip(image, text, scale, bias, groups, row_weight):
    row_loss = ops.siglip_forward(image, text, scale, bias, groups)
    grad_image, grad_text, grad_scale, grad_bias = ops.siglip_backward(image, text, scale, bias, groups, row_weight)
    assert grad_scale.dim() == 0 and grad_bias.dim() == 0
    expected = siglip_reference(image, text, scale, bias, groups, row_weight, torch.float64)
    baseline = siglip_reference(image, text, scale, bias, groups, row_weight, torch.float32)
    actual = {"row_loss": row_loss, "grad_image": grad_image, "grad_text": grad_text, "grad_scale": grad_scale,
              "grad_bias": grad_bias}
    for name in actual:
        assert_close(name, actual[name], expected[name], baseline[name])


# ---------------------------------------------------------------------------------------------------------------
# CLIP

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,dim", SIZES)
def test_clip_matches_float64(batch, dim, dtype):
    generator = torch.Generator().manual_seed(batch * 1000 + dim)
    image, text = make_features(batch, dim, dtype, generator)
    scale = per_anchor_scale(batch, generator, 1.0, 20.0)
    row_weight = torch.rand(batch, generator=generator)
    col_weight = torch.rand(batch, generator=generator)
    check_clip(image, text, scale, row_weight, col_weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,dim", [(37, 70), (300, 70), (600, 3)])
def test_clip_large_scale_unnormalised_features(batch, dim, dtype):
    """Scale up to 100 on features of norm 10: logits up to 1e4, which only max-subtracted LSEs survive."""
    generator = torch.Generator().manual_seed(7 + batch + dim)
    image, text = make_features(batch, dim, dtype, generator, norm=10.0)
    scale = per_anchor_scale(batch, generator, 10.0, 100.0)
    scale[0] = 100.0
    weight = torch.full((batch,), 1.0 / (2 * batch))
    check_clip(image, text, scale, weight, weight)


def test_clip_matches_float64_for_strided_inputs():
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(70, 300, generator=generator).T  # (300, 70), column-major
    text = torch.randn(300, 140, generator=generator)[:, ::2]
    scale = per_anchor_scale(600, generator, 1.0, 20.0)[::2]
    check_clip(image, text, scale, torch.rand(300, generator=generator), torch.rand(300, generator=generator))


def test_clip_zero_sizes():
    row_lse, col_lse = ops.clip_forward(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0))
    assert row_lse.shape == (0,) and col_lse.shape == (0,)
    grads = ops.clip_backward(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0), row_lse, col_lse,
                              torch.zeros(0), torch.zeros(0))
    assert [tuple(g.shape) for g in grads] == [(0, 5), (0, 5), (0,)]
    # D = 0: every similarity is 0, so each LSE is log(B) and every gradient 0.
    check_clip(torch.zeros(5, 0), torch.zeros(5, 0), torch.rand(5) + 1, torch.rand(5), torch.rand(5))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_clip_and_siglip_match_float64_with_any_thread_count(threads):
    """The schedule groups the blocks by thread count: B = 700 is three blocks, in groups of 1 and 2 blocks with two
    threads and of one block each with three. A race between tasks would show as a gross error."""
    generator = torch.Generator().manual_seed(11)
    image, text = make_features(700, 20, torch.float32, generator)
    scale = per_anchor_scale(700, generator, 1.0, 20.0)
    weight = torch.rand(700, generator=generator)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_clip(image, text, scale, weight, weight.flip(0))
        check_siglip(image, text, torch.tensor(5.0), torch.tensor(-3.0), torch.arange(700) // 4, weight)
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# SigLIP

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,dim", SIZES)
def test_siglip_matches_float64(batch, dim, dtype):
    generator = torch.Generator().manual_seed(batch * 1000 + dim + 1)
    image, text = make_features(batch, dim, dtype, generator)
    scale = torch.tensor(3.0)
    bias = torch.tensor(-2.5)
    # Groups with duplicates: about three rows per group, so every row has positives beyond the diagonal.
    groups = torch.randint(0, max(1, batch // 3), (batch,), generator=generator) * 1000 - 7
    row_weight = torch.rand(batch, generator=generator)
    check_siglip(image, text, scale, bias, groups, row_weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_siglip_large_scale_unnormalised_features(dtype):
    generator = torch.Generator().manual_seed(5)
    image, text = make_features(300, 70, dtype, generator, norm=10.0)
    groups = torch.arange(300) // 2
    check_siglip(image, text, torch.tensor(100.0), torch.tensor(-10.0), groups, torch.full((300,), 1 / 300))


def test_siglip_zero_sizes():
    assert ops.siglip_forward(torch.zeros(0, 4), torch.zeros(0, 4), torch.tensor(1.0), torch.tensor(0.0),
                              torch.zeros(0, dtype=torch.int64)).shape == (0,)
    grads = ops.siglip_backward(torch.zeros(0, 4), torch.zeros(0, 4), torch.tensor(1.0), torch.tensor(0.0),
                                torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    assert [tuple(g.shape) for g in grads] == [(0, 4), (0, 4), (), ()]
    assert float(grads[2]) == 0.0 and float(grads[3]) == 0.0
    check_siglip(torch.zeros(4, 0), torch.zeros(4, 0), torch.tensor(2.0), torch.tensor(-1.0),
                 torch.tensor([0, 1, 0, 2]), torch.rand(4))


def test_nan_never_passes():
    """A NaN feature reaches every statistic it enters: its row, every column, and the gradients."""
    generator = torch.Generator().manual_seed(13)
    image, text = make_features(300, 16, torch.float32, generator)
    image[5, 3] = float("nan")
    scale, weight = per_anchor_scale(300, generator, 1.0, 20.0), torch.rand(300, generator=generator)
    row_lse, col_lse = ops.clip_forward(image, text, scale)
    assert bool(row_lse[5].isnan()) and bool(torch.isfinite(torch.cat([row_lse[:5], row_lse[6:]])).all())
    assert bool(col_lse.isnan().all())
    for grad in ops.clip_backward(image, text, scale, row_lse, col_lse, weight, weight):
        assert bool(grad.isnan().any())
    row_loss = ops.siglip_forward(image, text, torch.tensor(2.0), torch.tensor(-1.0), torch.arange(300))
    assert bool(row_loss[5].isnan()) and int(row_loss.isnan().sum()) == 1
    for grad in ops.siglip_backward(image, text, torch.tensor(2.0), torch.tensor(-1.0), torch.arange(300), weight):
        assert bool(grad.isnan().any())


# ---------------------------------------------------------------------------------------------------------------
# Bad input: TypeError / ValueError naming the argument, before any work.

def _clip_args(batch=4, dim=3, dtype=torch.float32):
    return {"image": torch.randn(batch, dim).to(dtype), "text": torch.randn(batch, dim).to(dtype),
            "scale": torch.ones(batch), "row_lse": torch.zeros(batch), "col_lse": torch.zeros(batch),
            "row_weight": torch.ones(batch), "col_weight": torch.ones(batch)}


def _call_clip_forward(args):
    return ops.clip_forward(args["image"], args["text"], args["scale"])


def _call_clip_backward(args):
    return ops.clip_backward(*(args[name] for name in ("image", "text", "scale", "row_lse", "col_lse", "row_weight",
                                                        "col_weight")))


def _siglip_args(batch=4, dim=3):
    return {"image": torch.randn(batch, dim), "text": torch.randn(batch, dim), "scale": torch.tensor(1.0),
            "bias": torch.tensor(0.0), "groups": torch.arange(batch), "row_weight": torch.ones(batch)}


def _call_siglip_forward(args):
    return ops.siglip_forward(*(args[name] for name in ("image", "text", "scale", "bias", "groups")))


def _call_siglip_backward(args):
    return ops.siglip_backward(*(args[name] for name in ("image", "text", "scale", "bias", "groups", "row_weight")))


FEATURE_OPS = [("clip_forward", _clip_args, _call_clip_forward), ("clip_backward", _clip_args, _call_clip_backward),
               ("siglip_forward", _siglip_args, _call_siglip_forward),
               ("siglip_backward", _siglip_args, _call_siglip_backward)]


@pytest.mark.parametrize("op,make_args,call", FEATURE_OPS, ids=[case[0] for case in FEATURE_OPS])
def test_bad_features_name_the_argument(op, make_args, call):
    for bad_dtype in (torch.int32, torch.float64):
        args = make_args()
        args["image"] = args["image"].to(bad_dtype)
        args["text"] = args["text"].to(bad_dtype)
        with pytest.raises(TypeError, match=rf"leanops.{op}: argument 'image' has dtype {bad_dtype}; the kernels "
                                            r"support torch.bfloat16, torch.float16 and torch.float32"):
            call(args)
    args = make_args()
    args["text"] = args["text"].half()
    with pytest.raises(TypeError, match=rf"leanops.{op}: argument 'text' has dtype torch.float16 but 'image' has "
                                        r"dtype torch.float32"):
        call(args)
    args = make_args()
    args["text"] = args["text"][:, :2]
    with pytest.raises(ValueError, match=rf"leanops.{op}: argument 'text' has shape \[4, 2\] but 'image' has shape "
                                         r"\[4, 3\]"):
        call(args)
    args = make_args()
    args["image"] = args["image"][0]
    args["text"] = args["text"][0]
    with pytest.raises(ValueError, match=rf"leanops.{op}: argument 'image' must be 2-D"):
        call(args)


@pytest.mark.parametrize("op,call,names", [
    ("clip_forward", _call_clip_forward, ["scale"]),
    ("clip_backward", _call_clip_backward, ["scale", "row_lse", "col_lse", "row_weight", "col_weight"]),
])
def test_bad_clip_statistics_name_the_argument(op, call, names):
    for name in names:
        args = _clip_args()
        args[name] = args[name].double()
        with pytest.raises(TypeError, match=rf"leanops.{op}: argument '{name}' has dtype torch.float64; expected "
                                            r"torch.float32"):
            call(args)
        args = _clip_args()
        args[name] = torch.ones(5)
        with pytest.raises(ValueError, match=rf"leanops.{op}: argument '{name}' has shape \[5\]; expected \(4,\)"):
            call(args)
        args = _clip_args()
        args[name] = torch.ones(4, 1)
        with pytest.raises(ValueError, match=rf"leanops.{op}: argument '{name}' has shape \[4, 1\]"):
            call(args)


@pytest.mark.parametrize("op,call", [("siglip_forward", _call_siglip_forward),
                                     ("siglip_backward", _call_siglip_backward)])
def test_bad_siglip_arguments_name_the_argument(op, call):
    for name in ("scale", "bias"):
        args = _siglip_args()
        args[name] = args[name].double()
        with pytest.raises(TypeError, match=rf"leanops.{op}: argument '{name}' has dtype torch.float64; expected "
                                            r"torch.float32"):
            call(args)
        args = _siglip_args()
        args[name] = args[name].reshape(1)
        with pytest.raises(ValueError, match=rf"leanops.{op}: argument '{name}' has shape \[1\]; expected a 0-dim"):
            call(args)
    args = _siglip_args()
    args["groups"] = args["groups"].int()
    with pytest.raises(TypeError, match=rf"leanops.{op}: argument 'groups' has dtype torch.int32; expected "
                                        r"torch.int64"):
        call(args)
    args = _siglip_args()
    args["groups"] = args["groups"][:3]
    with pytest.raises(ValueError, match=rf"leanops.{op}: argument 'groups' has shape \[3\]; expected \(4,\)"):
        call(args)
    if op == "siglip_backward":
        args = _siglip_args()
        args["row_weight"] = args["row_weight"].half()
        with pytest.raises(TypeError, match=r"argument 'row_weight' has dtype torch.float16; expected torch.float32"):
            call(args)
        args = _siglip_args()
        args["row_weight"] = torch.ones(3)
        with pytest.raises(ValueError, match=r"argument 'row_weight' has shape \[3\]; expected \(4,\)"):
            call(args)
