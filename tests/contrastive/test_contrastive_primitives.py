"""The blockwise contrastive primitives (clip_forward, clip_backward, siglip_forward, siglip_backward; csrc/ops.cpp
states their contract) of every provider of ``leanops.ops.CONTRASTIVE``, called directly through
``CONTRASTIVE.provider(backend).operators``, against the dense formulas of that contract evaluated in float64 (this
module's ``*_dense`` functions: the only place where the B x B similarity matrix is built).

Tolerance: ``helpers.assert_flash_attention_rule``, the same for every provider. Every output is float32 (float64
for float64 features) and accumulates in float32 whatever the feature dtype (16-bit products are exact in float32),
so bfloat16 and float16 features are held to the bar of float32 ones: the largest error, relative to the largest
expected magnitude, must be at most max(floor, 2 x the error of the same dense formula run in plain float32 PyTorch).
The floor is 1e-5, except where a provider rounds on purpose (``gradient_floor``). SigLIP's two scalar gradients
are sums that may cancel: their errors are relative to the size of their terms (sum |D S| and sum |D|).

Sizes per provider (``SIZES``): B = 1 and 2, D = 1 and 3, B and D no multiple of any block: the C++ CPU kernels'
256-row blocks, the CUDA kernels' 64-row tiles and 32-dimension chunks (D = 512: their 16-byte vector loads), the
interpreter's 16-row blocks and 32 gradient columns (B = 37 is three row blocks, B = 130 nine, D = 70 three gradient
column chunks), the reference's row blocks (shrunk to 64 rows here: B = 130 and 300 span several).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import (DTYPES, assert_flash_attention_rule, assert_layouts_give_the_same_bits,
                     assert_same_bits_on_every_call_and_stream, interpreted, marked, provider_cases,
                     provider_dtype_cases, unit_roundoff)
from leanops.ops import CONTRASTIVE
from leanops.reference import contrastive as reference

CASES = provider_cases(CONTRASTIVE)
COMPILED_CASES = provider_cases(CONTRASTIVE, backends_=("cpu", "cuda"))
TRITON_CASES = provider_cases(CONTRASTIVE, backends_=("triton",))

SIZES = {
    "reference": [(1, 1), (2, 3), (37, 70), (130, 16)],
    "cpu": [(1, 1), (1, 70), (2, 3), (37, 1), (37, 70), (300, 3), (300, 70), (1000, 100)],
    "cuda": [(batch, dim) for batch in (1, 2, 37, 130, 1000) for dim in (1, 3, 70, 512)],
    "triton": [(1, 1), (2, 3), (19, 1), (37, 70)],
}
# More blocks of the same paths, slower (the interpreter's nine row blocks, the reference's five): marked slow.
SLOW_SIZES = {"reference": [(300, 3)], "triton": [(130, 3)]}
ALL_SIZES = (provider_dtype_cases(CONTRASTIVE, DTYPES, SIZES)
             + marked(provider_dtype_cases(CONTRASTIVE, DTYPES, SLOW_SIZES), pytest.mark.slow))
# Logits up to ~1e5 (|S| ~ 1e3 at scale 100), far beyond exp's float32 range.
LARGE_SIZES = {"reference": [(130, 70)], "cpu": [(37, 70), (300, 70), (600, 3)], "cuda": [(130, 70), (1000, 512)],
               "triton": [(37, 70)]}

CLIP_FORWARD = ("row_lse", "col_lse")
CLIP_BACKWARD = ("grad_image", "grad_text", "grad_scale")
SIGLIP_FORWARD = ("row_loss",)
SIGLIP_BACKWARD = ("grad_image", "grad_text", "grad_scale", "grad_bias")


def gradient_floor(backend: str, dtype: torch.dtype) -> float:
    """The floor of the tolerance for a provider's gradients (statistics: 1e-5 everywhere). The GPU providers
    (Triton, CUDA) write the panel of G (or D) in the feature dtype before its GEMMs with the features, as
    FlashAttention does with P: 16-bit features' gradients carry a few units of that rounding."""
    if dtype in (torch.float32, torch.float64):
        return 1e-5
    if backend in ("triton", "cuda"):
        return 4 * unit_roundoff(dtype)
    return 1e-5


@pytest.fixture(autouse=True)
def _reference_blocks_of_64_rows(request, monkeypatch):
    """The reference provider's row blocks (1024 rows) shrunk to 64 rows, so that its column statistics are merged
    across several blocks at the sizes tested here."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "reference":
        monkeypatch.setattr(reference, "BLOCK_ROWS", 64)


# ---------------------------------------------------------------------------------------------------------------
# The dense formulas of the contract (csrc/ops.cpp), on whatever dtype their arguments have: float64 for the
# oracle, float32 for plain PyTorch's error.

def clip_forward_dense(image, text, scale):
    similarity = image @ text.T
    return (torch.logsumexp(scale[:, None] * similarity, dim=1),
            torch.logsumexp(scale[None, :] * similarity, dim=0))


def clip_backward_dense(image, text, scale, row_lse, col_lse, row_weight, col_weight):
    similarity = image @ text.T
    p = torch.exp(scale[:, None] * similarity - row_lse[:, None])
    q = torch.exp(scale[None, :] * similarity - col_lse[None, :])
    g = (row_weight * scale)[:, None] * p + (col_weight * scale)[None, :] * q
    grad_scale = row_weight * (p * similarity).sum(dim=1) + col_weight * (q * similarity).sum(dim=0)
    return g @ text, g.T @ image, grad_scale


def _siglip_terms(image, text, scale, bias, groups):
    similarity = image @ text.T
    label = torch.where(groups[:, None] == groups[None, :], 1.0, -1.0).to(similarity.dtype)
    return similarity, label, scale * similarity + bias


def siglip_forward_dense(image, text, scale, bias, groups):
    _, label, logits = _siglip_terms(image, text, scale, bias, groups)
    return F.softplus(-label * logits).sum(dim=1)


def siglip_backward_dense(image, text, scale, bias, groups, row_weight):
    similarity, label, logits = _siglip_terms(image, text, scale, bias, groups)
    d = -row_weight[:, None] * label * torch.sigmoid(-label * logits)
    return scale * (d @ text), scale * (d.T @ image), (d * similarity).sum(), d.sum()


def siglip_scalar_magnitudes(image, text, scale, bias, groups, row_weight):
    """(sum |D S|, sum |D|) in float64: the size of the terms of grad_scale and grad_bias."""
    similarity, label, logits = _siglip_terms(*_converted((image, text, scale, bias, groups)))
    d = -row_weight.double().cpu()[:, None] * label * torch.sigmoid(-label * logits)
    return (d * similarity).abs().sum().item(), d.abs().sum().item()


# ---------------------------------------------------------------------------------------------------------------
# Checks.

def _converted(arguments, precision=torch.float64, device="cpu"):
    """Floating-point tensors converted to `precision` on `device`; integer tensors (group ids) moved only."""
    return tuple(t.detach().to(device=device, dtype=precision) if t.is_floating_point() else t.detach().to(device)
                 for t in arguments)


def compare(names, actual, formula, arguments, floor, magnitudes=None, oracle_device="cpu"):
    """Each output of a provider against formula(arguments) in float64 with the flash-attention rule, plain float32
    PyTorch's error computed on the CPU (no TF32)."""
    actual = (actual,) if isinstance(actual, torch.Tensor) else tuple(actual)
    expected = formula(*_converted(arguments, torch.float64, oracle_device))
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    plain = formula(*_converted(arguments, torch.float32))
    plain = (plain,) if isinstance(plain, torch.Tensor) else plain
    assert len(actual) == len(expected) == len(names)
    magnitudes = magnitudes or (None,) * len(names)
    for name, a, e, p, magnitude in zip(names, actual, expected, plain, magnitudes):
        assert_flash_attention_rule(name, a, e, p, floor=floor, magnitude=magnitude, dtype=torch.float32,
                                    device=arguments[0].device)


def check_clip(backend, image, text, scale, row_weight, col_weight, oracle_device="cpu"):
    """Both CLIP primitives of `backend` against the dense formulas; the backward takes the forward's own
    log-sum-exps, as in training. Returns every output."""
    operators = CONTRASTIVE.provider(backend).operators
    statistics = operators.clip_forward(image, text, scale)
    compare(CLIP_FORWARD, statistics, clip_forward_dense, (image, text, scale), 1e-5, oracle_device=oracle_device)
    arguments = (image, text, scale, *statistics, row_weight, col_weight)
    grads = operators.clip_backward(*arguments)
    compare(CLIP_BACKWARD, grads, clip_backward_dense, arguments, gradient_floor(backend, image.dtype),
            oracle_device=oracle_device)
    return tuple(statistics) + tuple(grads)


def check_siglip(backend, image, text, scale, bias, groups, row_weight):
    operators = CONTRASTIVE.provider(backend).operators
    arguments = (image, text, scale, bias, groups)
    row_loss = operators.siglip_forward(*arguments)
    compare(SIGLIP_FORWARD, row_loss, siglip_forward_dense, arguments, 1e-5)
    grads = operators.siglip_backward(*arguments, row_weight)
    assert grads[2].dim() == 0 and grads[3].dim() == 0
    magnitudes = (None, None) + siglip_scalar_magnitudes(*arguments, row_weight)
    compare(SIGLIP_BACKWARD, grads, siglip_backward_dense, arguments + (row_weight,),
            gradient_floor(backend, image.dtype), magnitudes)
    return (row_loss,) + tuple(grads)


# ---------------------------------------------------------------------------------------------------------------
# Inputs.

def make_features(batch, dim, dtype, device, generator, magnitude=1.0):
    """(image, text): matching rows correlated (as after training), unnormalised, row norms around `magnitude`."""
    image = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    text = image + 0.5 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    factor = magnitude / max(dim, 1) ** 0.5
    return (image * factor).to(dtype).to(device), (text * factor).to(dtype).to(device)


def clip_inputs(batch, dim, dtype, device, seed, magnitude=1.0, max_scale=20.0):
    """(image, text, scale, row_weight, col_weight): per-anchor scales in [1, max_scale] (the first at max_scale),
    signed weights (any upstream gradient) whose last entry is zero."""
    generator = torch.Generator().manual_seed(seed)
    image, text = make_features(batch, dim, dtype, device, generator, magnitude)
    scale = 1.0 + (max_scale - 1.0) * torch.rand(batch, generator=generator)
    scale[:1] = max_scale
    return (image, text, scale.to(device), signed_weights(batch, device, generator),
            signed_weights(batch, device, generator))


def signed_weights(batch, device, generator):
    weight = torch.randn(batch, generator=generator)
    if batch > 1:
        weight[-1] = 0.0
    return weight.to(device)


def siglip_inputs(batch, dim, dtype, device, seed, magnitude=1.0, scale=10.0, bias=-10.0, groups=None):
    """(image, text, scale, bias, groups, row_weight): by default negative, sparse group ids with about three rows
    per group, so that rows have positives beyond the diagonal."""
    generator = torch.Generator().manual_seed(seed)
    image, text = make_features(batch, dim, dtype, device, generator, magnitude)
    if groups is None:
        groups = torch.randint(0, max(1, batch // 3), (batch,), generator=generator) * 1000 - 7
    return (image, text, torch.tensor(scale, device=device), torch.tensor(bias, device=device), groups.to(device),
            signed_weights(batch, device, generator))


# ---------------------------------------------------------------------------------------------------------------
# Every provider: accuracy.

@pytest.mark.parametrize("backend,device,dtype,size", ALL_SIZES)
def test_clip_matches_float64(backend, device, dtype, size):
    batch, dim = size
    check_clip(backend, *clip_inputs(batch, dim, dtype, device, seed=batch * 1000 + dim))


@pytest.mark.parametrize("backend,device,dtype,size", ALL_SIZES)
def test_siglip_matches_float64(backend, device, dtype, size):
    batch, dim = size
    check_siglip(backend, *siglip_inputs(batch, dim, dtype, device, seed=batch * 1000 + dim + 1))


@pytest.mark.parametrize("backend,device,dtype,size", provider_dtype_cases(CONTRASTIVE, DTYPES, LARGE_SIZES))
@pytest.mark.gpu_check
def test_large_logits(backend, device, dtype, size):
    """|S| ~ 1e3 and scale 100: logits ~ 1e5, which only max-subtracted (running) log-sum-exps survive; softplus
    and sigmoid stay finite and accurate."""
    batch, dim = size
    image, text, scale, _, _ = clip_inputs(batch, dim, dtype, device, seed=7 + batch, magnitude=30.0)
    assert (image.double() @ text.double().T).abs().max().item() > 500
    weight = torch.full((batch,), 0.5 / batch, device=device)
    check_clip(backend, image, text, torch.full_like(scale, 100.0), weight, weight)
    check_siglip(backend, *siglip_inputs(batch, dim, dtype, device, seed=8 + batch, magnitude=30.0, scale=100.0))


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs(backend, device):
    """Column-major image, every other column of text, a strided scale: the same results as contiguous inputs."""
    batch, dim = (37, 20) if interpreted(backend, device) else (300, 70)
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(dim, batch, generator=generator).to(device).T
    text = torch.randn(batch, 2 * dim, generator=generator).to(device)[:, ::2]
    scale = (1.0 + 19.0 * torch.rand(2 * batch, generator=generator)).to(device)[::2]
    weight = torch.rand(2 * batch, generator=generator).to(device)[::2]
    assert not (image.is_contiguous() or text.is_contiguous() or scale.is_contiguous())
    check_clip(backend, image, text, scale, weight, weight.flip(0))
    groups = (torch.arange(2 * batch, device=device) // 5)[::2]
    check_siglip(backend, image, text, torch.tensor(5.0, device=device), torch.tensor(-3.0, device=device), groups,
                 weight)


@pytest.mark.parametrize("kind", ["64-bit-ids", "all-equal", "all-distinct"])
@pytest.mark.parametrize("backend,device", CASES)
def test_siglip_group_ids(backend, device, kind):
    """Labels compare the full int64 ids: three groups whose ids share their low 32 bits (and are negative) stay
    three groups; every row positive with every column; only the diagonal positive."""
    batch, dim = (37, 20) if interpreted(backend, device) else (130, 70)
    groups = {"64-bit-ids": (torch.arange(batch) % 3) * 2**32 - 5, "all-equal": torch.full((batch,), 7),
              "all-distinct": torch.arange(batch)}[kind]
    check_siglip(backend, *siglip_inputs(batch, dim, torch.float32, device, seed=9, groups=groups))


@pytest.mark.parametrize("backend,device", CASES)
def test_siglip_forward_separated_pairs(backend, device):
    """Every pair far on its correct side: each softplus term is tiny (exp(-20) or less) and must not round to 0."""
    image = torch.eye(5, 3) * 4.0
    image[3:] = torch.tensor([[0.0, 0.0, -4.0], [-4.0, 0.0, 0.0]])
    arguments = (image.to(device), image.clone().to(device), torch.tensor(3.0, device=device),
                 torch.tensor(-20.0, device=device), torch.arange(5, device=device))
    expected = siglip_forward_dense(*_converted(arguments))
    actual = CONTRASTIVE.provider(backend).operators.siglip_forward(*arguments)
    assert bool((expected > 0).all()) and bool((expected < 1e-6).all())
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("primitive", ["clip", "siglip"])
@pytest.mark.parametrize("kind", ["empty-batch", "no-features"])
@pytest.mark.parametrize("backend,device", CASES)
def test_zero_sizes(backend, device, kind, primitive):
    """B = 0: empty outputs (zero scalar gradients). D = 0: every similarity is 0, so each log-sum-exp is log(B),
    and the gradients follow from the formulas (SigLIP's grad_bias is not 0)."""
    batch, dim = (0, 5) if kind == "empty-batch" else (6, 0)
    if primitive == "clip":
        outputs = check_clip(backend, *clip_inputs(batch, dim, torch.float32, device, seed=14))
        expected_shapes = [(batch,), (batch,), (batch, dim), (batch, dim), (batch,)]
    else:
        outputs = check_siglip(backend, *siglip_inputs(batch, dim, torch.float32, device, seed=15))
        expected_shapes = [(batch,), (batch, dim), (batch, dim), (), ()]
        if batch == 0:
            assert float(outputs[3]) == 0.0 and float(outputs[4]) == 0.0
    assert [tuple(t.shape) for t in outputs] == expected_shapes


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend,device", CASES)
def test_nan_never_passes(backend, device):
    """A NaN feature reaches every statistic it enters: its row, every column, and the gradients."""
    batch = 40 if interpreted(backend, device) else 300
    operators = CONTRASTIVE.provider(backend).operators
    image, text, scale, weight, _ = clip_inputs(batch, 16, torch.float32, device, seed=13)
    image[5, 3] = float("nan")
    row_lse, col_lse = operators.clip_forward(image, text, scale)
    assert bool(row_lse[5].isnan()) and bool(torch.isfinite(torch.cat([row_lse[:5], row_lse[6:]])).all())
    assert bool(col_lse.isnan().all())
    for grad in operators.clip_backward(image, text, scale, row_lse, col_lse, weight, weight):
        assert bool(grad.isnan().any())
    s, b, groups = torch.tensor(2.0, device=device), torch.tensor(-1.0, device=device), torch.arange(batch,
                                                                                                      device=device)
    row_loss = operators.siglip_forward(image, text, s, b, groups)
    assert bool(row_loss[5].isnan()) and int(row_loss.isnan().sum()) == 1
    for grad in operators.siglip_backward(image, text, s, b, groups, weight):
        assert bool(grad.isnan().any())


@pytest.mark.parametrize("backend,device", provider_cases(CONTRASTIVE, backends_=("reference",)))
def test_float64_features_give_float64_results(backend, device):
    """Only the reference serves float64 (the kernels refuse it: test_bad_features_name_the_argument): every output
    float64, as accurate as float64 (against the dense formulas, 1e-12 of the largest magnitude)."""
    operators = CONTRASTIVE.provider(backend).operators
    image, text, scale, row_weight, col_weight = clip_inputs(130, 9, torch.float64, device, seed=16)
    scale = scale.double()
    statistics = operators.clip_forward(image, text, scale)
    arguments = (image, text, scale, *statistics, row_weight.double(), col_weight.double())
    outputs = tuple(statistics) + tuple(operators.clip_backward(*arguments))
    expected = clip_forward_dense(image, text, scale) + clip_backward_dense(*arguments)
    siglip = siglip_inputs(130, 9, torch.float64, device, seed=17)
    siglip = siglip[:2] + (siglip[2].double(), siglip[3].double(), siglip[4], siglip[5].double())
    outputs += (operators.siglip_forward(*siglip[:5]),) + tuple(operators.siglip_backward(*siglip))
    expected += (siglip_forward_dense(*siglip[:5]),) + siglip_backward_dense(*siglip)
    for index, (a, e) in enumerate(zip(outputs, expected)):
        assert_flash_attention_rule(f"output {index}", a, e, e, floor=1e-12, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# The C++ kernels (cpu, cuda): bad input is a TypeError / ValueError naming the argument, before any work. (The
# reference and Triton providers take arguments the public functions have checked.)

def _clip_args(device, batch=4, dim=3):
    return {"image": torch.randn(batch, dim, device=device), "text": torch.randn(batch, dim, device=device),
            "scale": torch.ones(batch, device=device), "row_lse": torch.zeros(batch, device=device),
            "col_lse": torch.zeros(batch, device=device), "row_weight": torch.ones(batch, device=device),
            "col_weight": torch.ones(batch, device=device)}


def _siglip_args(device, batch=4, dim=3):
    return {"image": torch.randn(batch, dim, device=device), "text": torch.randn(batch, dim, device=device),
            "scale": torch.tensor(1.0, device=device), "bias": torch.tensor(0.0, device=device),
            "groups": torch.arange(batch, device=device), "row_weight": torch.ones(batch, device=device)}


ARGUMENTS = {"clip_forward": ("image", "text", "scale"),
             "clip_backward": ("image", "text", "scale", "row_lse", "col_lse", "row_weight", "col_weight"),
             "siglip_forward": ("image", "text", "scale", "bias", "groups"),
             "siglip_backward": ("image", "text", "scale", "bias", "groups", "row_weight")}


def _refused(backend, device, op, error, pattern, **changes):
    """`op` with valid arguments but for `changes` (name -> function of the valid value) raises `error`, its message
    starting with the operator's name and matching `pattern`."""
    args = (_clip_args if op.startswith("clip") else _siglip_args)(device)
    for name, change in changes.items():
        args[name] = change(args[name])
    with pytest.raises(error, match=rf"leanops.{op}: {pattern}"):
        getattr(CONTRASTIVE.provider(backend).operators, op)(*(args[name] for name in ARGUMENTS[op]))


@pytest.mark.parametrize("op", list(ARGUMENTS))
@pytest.mark.parametrize("backend,device", COMPILED_CASES)
def test_bad_features_name_the_argument(backend, device, op):
    for bad in (torch.int32, torch.float64):
        _refused(backend, device, op, TypeError, rf"argument 'image' has dtype {bad}; the kernels support "
                 r"torch.bfloat16, torch.float16 and torch.float32", image=lambda t: t.to(bad),
                 text=lambda t: t.to(bad))
    _refused(backend, device, op, TypeError, r"argument 'text' has dtype torch.float16 but 'image' has dtype "
             r"torch.float32", text=torch.Tensor.half)
    _refused(backend, device, op, ValueError, r"argument 'text' has shape \[4, 2\] but 'image' has shape \[4, 3\]",
             text=lambda t: t[:, :2])
    _refused(backend, device, op, ValueError, r"argument 'image' must be 2-D", image=lambda t: t[0],
             text=lambda t: t[0])


@pytest.mark.parametrize("op", ["clip_forward", "clip_backward"])
@pytest.mark.parametrize("backend,device", COMPILED_CASES)
def test_bad_clip_statistics_name_the_argument(backend, device, op):
    for name in ARGUMENTS[op][2:]:
        _refused(backend, device, op, TypeError, rf"argument '{name}' has dtype torch.float64; expected torch.float32",
                 **{name: torch.Tensor.double})
        _refused(backend, device, op, ValueError, rf"argument '{name}' has shape \[5\]; expected \(4,\)",
                 **{name: lambda t: torch.ones(5, device=t.device)})
        _refused(backend, device, op, ValueError, rf"argument '{name}' has shape \[4, 1\]",
                 **{name: lambda t: t[:, None]})
        if device == "cuda":
            _refused(backend, device, op, ValueError, rf".*'{name}'", **{name: torch.Tensor.cpu})


@pytest.mark.parametrize("op", ["siglip_forward", "siglip_backward"])
@pytest.mark.parametrize("backend,device", COMPILED_CASES)
def test_bad_siglip_arguments_name_the_argument(backend, device, op):
    for name in ("scale", "bias"):
        _refused(backend, device, op, TypeError, rf"argument '{name}' has dtype torch.float64; expected torch.float32",
                 **{name: torch.Tensor.double})
        _refused(backend, device, op, ValueError, rf"argument '{name}' has shape \[1\]; expected a 0-dim",
                 **{name: lambda t: t.reshape(1)})
    _refused(backend, device, op, TypeError, r"argument 'groups' has dtype torch.int32; expected torch.int64",
             groups=torch.Tensor.int)
    _refused(backend, device, op, ValueError, r"argument 'groups' has shape \[3\]; expected \(4,\)",
             groups=lambda t: t[:3])
    if op == "siglip_backward":
        _refused(backend, device, op, TypeError, r"argument 'row_weight' has dtype torch.float16; expected "
                 r"torch.float32", row_weight=torch.Tensor.half)
        _refused(backend, device, op, ValueError, r"argument 'row_weight' has shape \[3\]; expected \(4,\)",
                 row_weight=lambda t: t[:3])


# ---------------------------------------------------------------------------------------------------------------
# The C++ CPU kernels.

@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("backend,device", provider_cases(CONTRASTIVE, backends_=("cpu",)))
def test_cpu_kernels_any_thread_count(backend, device, threads):
    """The schedule groups the blocks by thread count: B = 700 is three blocks, in groups of 1 and 2 blocks with two
    threads and of one block each with three. A race between tasks would show as a gross error."""
    image, text, scale, weight, _ = clip_inputs(700, 20, torch.float32, device, seed=11)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_clip(backend, image, text, scale, weight, weight.flip(0))
        check_siglip(backend, image, text, torch.tensor(5.0), torch.tensor(-3.0), torch.arange(700) // 4, weight)
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernels: several panels, reproducibility, every GPU tile candidate, the zero-padding of D.

def _triton_kernels():
    from leanops.triton_kernels import contrastive
    return contrastive


def _check_triton_backwards(clip, siglip):
    """The Triton launchers' backward against the dense formulas."""
    kernels = _triton_kernels()
    image, text, scale, row_weight, col_weight = clip
    row_lse, col_lse = kernels.clip_forward(image, text, scale)
    arguments = (image, text, scale, row_lse, col_lse, row_weight, col_weight)
    compare(CLIP_BACKWARD, kernels.clip_backward(*arguments), clip_backward_dense, arguments,
            gradient_floor("triton", image.dtype))
    magnitudes = (None, None) + siglip_scalar_magnitudes(*siglip)
    compare(SIGLIP_BACKWARD, kernels.siglip_backward(*siglip), siglip_backward_dense, siglip,
            gradient_floor("triton", siglip[0].dtype), magnitudes)


@pytest.mark.parametrize("budget", ["0.002", "0.02"])
@pytest.mark.parametrize("backend,device,dtype,size", [case for case in ALL_SIZES if case.values[0] == "triton"])
def test_triton_several_panels(backend, device, dtype, size, budget, monkeypatch):
    """A memory budget (MiB) small enough for several row panels in the backward and several column panels in the
    CLIP forward: the panels' partial sums and statistics merge to the same results."""
    monkeypatch.setenv("LEANOPS_PANEL_BUDGET_MIB", budget)
    batch, dim = size
    image, text, scale, row_weight, col_weight = clip_inputs(batch, dim, dtype, device, seed=batch + dim)
    kernels = _triton_kernels()
    compare(CLIP_FORWARD, kernels.clip_forward(image, text, scale), clip_forward_dense, (image, text, scale), 1e-5)
    _check_triton_backwards((image, text, scale, row_weight, col_weight),
                            siglip_inputs(batch, dim, dtype, device, seed=batch + dim + 1))


@pytest.mark.parametrize("backend,device,dtype,size",
                         provider_dtype_cases(CONTRASTIVE, DTYPES, LARGE_SIZES, backends_=("triton",)))
def test_triton_several_panels_large_logits(backend, device, dtype, size, monkeypatch):
    monkeypatch.setenv("LEANOPS_PANEL_BUDGET_MIB", "0.002")
    batch, dim = size
    image, text, _, _, _ = clip_inputs(batch, dim, dtype, device, seed=7, magnitude=30.0)
    weight = torch.full((batch,), 0.5 / batch, device=device)
    clip = (image, text, torch.full((batch,), 100.0, device=device), weight, weight)
    _check_triton_backwards(clip, siglip_inputs(batch, dim, dtype, device, seed=8, magnitude=30.0, scale=100.0))


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_triton_backward_is_reproducible(backend, device, monkeypatch):
    """Two calls give the same bits (no atomics: the panels' sums run in a fixed order), with several panels."""
    monkeypatch.setenv("LEANOPS_PANEL_BUDGET_MIB", "0.002")
    kernels = _triton_kernels()
    image, text, scale, weight, _ = clip_inputs(37, 20, torch.float32, device, seed=11)
    row_lse, col_lse = kernels.clip_forward(image, text, scale)
    arguments = (image, text, scale, row_lse, col_lse, weight, weight)
    for a, b in zip(kernels.clip_backward(*arguments), kernels.clip_backward(*arguments)):
        assert torch.equal(a, b)
    siglip = siglip_inputs(37, 20, torch.float32, device, seed=12)
    for a, b in zip(kernels.siglip_backward(*siglip), kernels.siglip_backward(*siglip)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device,dtype,size", provider_dtype_cases(
    CONTRASTIVE, DTYPES, {"triton": [(300, 520)]}, backends_=("triton",), devices=("cuda",)))
def test_triton_every_tile_candidate_is_correct(backend, device, dtype, size, monkeypatch):
    """Each GPU tile candidate the tuner may pick, forced in turn: B = 300 is several row blocks of every candidate,
    D = 520 several K slices. (The interpreter has one tile size.)"""
    kernels = _triton_kernels()
    batch, dim = size
    forward = kernels.forward_tile_candidates(torch.device(device), dtype)
    backward = kernels.backward_tile_candidates(torch.device(device), dtype)
    for index in range(max(len(forward), len(backward))):
        chosen_forward, chosen_backward = forward[index % len(forward)], backward[index % len(backward)]
        monkeypatch.setattr(kernels, "forward_tile_candidates", lambda *_: (chosen_forward,))
        monkeypatch.setattr(kernels, "backward_tile_candidates", lambda *_: (chosen_backward,))
        clip = clip_inputs(batch, dim, dtype, device, seed=index)
        siglip = siglip_inputs(batch, dim, dtype, device, seed=index)
        compare(CLIP_FORWARD, kernels.clip_forward(*clip[:3]), clip_forward_dense, clip[:3], 1e-5)
        compare(SIGLIP_FORWARD, kernels.siglip_forward(*siglip[:5]), siglip_forward_dense, siglip[:5], 1e-5)
        _check_triton_backwards(clip, siglip)


@pytest.mark.parametrize("backend,device,dtype,size", provider_dtype_cases(
    CONTRASTIVE, DTYPES, {"triton": [(37, 21)]}, backends_=("triton",), devices=("cpu",)))
def test_triton_zero_padded_feature_dimension(backend, device, dtype, size, monkeypatch):
    """The GPU launchers pad D to a multiple of 16 (the GPU runs the padded path in every test); forced here under
    the interpreter, D = 21 (padded to 32): the same results, and contiguous gradients of the caller's D."""
    from leanops.triton_kernels import tiles
    monkeypatch.setattr(tiles, "feature_alignment", lambda _device: 16)
    batch, dim = size
    clip, siglip = clip_inputs(batch, dim, dtype, device, seed=5), siglip_inputs(batch, dim, dtype, device, seed=6)
    outputs = check_clip(backend, *clip) + check_siglip(backend, *siglip)
    assert all(t.is_contiguous() for t in outputs)
    _check_triton_backwards(clip, siglip)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernels: several row blocks per CTA, layouts, reproducibility, streams.

CUDA_CASES = provider_cases(CONTRASTIVE, backends_=("cuda",))


@pytest.mark.parametrize("backend,device", CUDA_CASES)
def test_cuda_several_row_blocks_per_cta(backend, device):
    """A batch with more 64-row blocks than clip_forward launches CTAs (2 per multiprocessor): each CTA merges the
    column statistics of several row blocks in its workspace slot. The oracle runs on the GPU (B ~ 17000)."""
    multiprocessors = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    batch = 64 * (2 * multiprocessors + 5) + 17
    check_clip(backend, *clip_inputs(batch, 40, torch.float32, device, seed=3), oracle_device="cuda")


def _all_outputs(backend, image, text, clip_scale, row_lse, col_lse, row_weight, col_weight, siglip_scale, bias,
                 groups):
    operators = CONTRASTIVE.provider(backend).operators
    return (tuple(operators.clip_forward(image, text, clip_scale))
            + tuple(operators.clip_backward(image, text, clip_scale, row_lse, col_lse, row_weight, col_weight))
            + (operators.siglip_forward(image, text, siglip_scale, bias, groups),)
            + tuple(operators.siglip_backward(image, text, siglip_scale, bias, groups, row_weight)))


def _all_arguments(backend, batch, dim, dtype, device, seed):
    image, text, scale, row_weight, col_weight = clip_inputs(batch, dim, dtype, device, seed)
    row_lse, col_lse = CONTRASTIVE.provider(backend).operators.clip_forward(image, text, scale)
    _, _, siglip_scale, bias, groups, _ = siglip_inputs(batch, dim, dtype, device, seed)
    return [image, text, scale, row_lse, col_lse, row_weight, col_weight, siglip_scale, bias, groups]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CUDA_CASES)
def test_cuda_layouts_give_bitwise_identical_results(backend, device, dtype):
    """Misaligned features (scalar instead of 16-byte loads) and non-contiguous inputs (copied) change nothing."""
    assert_layouts_give_the_same_bits(lambda *arguments: _all_outputs(backend, *arguments),
                                      _all_arguments(backend, 130, 512, dtype, device, seed=11))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CUDA_CASES)
def test_cuda_bitwise_reproducible_and_on_the_current_stream(backend, device, dtype):
    """No atomics: repeated calls agree bitwise, also when launched on a side stream."""
    arguments = _all_arguments(backend, 1000, 70, dtype, device, seed=12)
    assert_same_bits_on_every_call_and_stream(lambda: _all_outputs(backend, *arguments))
