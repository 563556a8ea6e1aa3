"""The loss ops' "never silently wrong" cases (issue 15): second derivatives, masked (-inf) vocabulary slots, the
value checks inside compiled graphs, and the smaller silent cases of linear_cross_entropy. Each test is named after
its case and runs on every CPU provider (Triton under its interpreter)."""
import math

import pytest
import torch
import torch.distributed as dist

import leanops
import oracles
from helpers import provider_cases, require_backend
from leanops.ops import CONTRASTIVE, CROSS_ENTROPY
from leanops.ops.registry import SecondDerivativeError

CPU_CONTRASTIVE = provider_cases(CONTRASTIVE, devices=("cpu",))
CPU_CROSS_ENTROPY = provider_cases(CROSS_ENTROPY, devices=("cpu",))


def _hessian_vector_product(loss_of, inputs, directions):
    """d/dinputs <d loss / d inputs, directions>: a second derivative (create_graph=True, then a second backward)."""
    gradients = torch.autograd.grad(loss_of(*inputs), inputs, create_graph=True)
    projection = sum((gradient * direction).sum() for gradient, direction in zip(gradients, directions))
    return torch.autograd.grad(projection, inputs)


def _assert_second_derivatives(loss_of, oracle_of, values, dtype, generator):
    """The provider's Hessian-vector product in `dtype` against the float64 oracle's, on the same values."""
    directions = [torch.randn(v.shape, dtype=torch.float64, generator=generator) for v in values]
    got = _hessian_vector_product(loss_of, [v.to(dtype).requires_grad_() for v in values],
                                  [d.to(dtype) for d in directions])
    expected = _hessian_vector_product(oracle_of, [v.clone().requires_grad_() for v in values], directions)
    tolerance = 1e-9 if dtype == torch.float64 else 2e-5
    for index, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == dtype
        error = (g.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
        assert error <= tolerance, f"input {index}: relative error {error:.3g} of the second derivative"


def _contrastive_values(generator, batch=7, dim=5):
    return [torch.randn(batch, dim, dtype=torch.float64, generator=generator),
            torch.randn(batch, dim, dtype=torch.float64, generator=generator), torch.tensor(2.5, dtype=torch.float64)]


def _float_for(backend):
    return torch.float64 if backend == "reference" else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# 1. Second derivatives: right on every provider (the dense formula differentiates them), or a clear error.

@pytest.mark.parametrize("backend,device", CPU_CONTRASTIVE)
@pytest.mark.parametrize("labels", [None, [0, 1, 0, 2, 1, 3, 3]], ids=["pairs", "groups"])
def test_clip_second_derivatives(backend, device, labels):
    generator = torch.Generator().manual_seed(1)
    labels = None if labels is None else torch.tensor(labels)
    _assert_second_derivatives(lambda x, y, s: leanops.clip_loss(x, y, s, labels=labels, backend=backend),
                               lambda x, y, s: oracles.clip_loss(x, y, s, labels=labels),
                               _contrastive_values(generator), _float_for(backend), generator)


@pytest.mark.parametrize("backend,device", CPU_CONTRASTIVE)
def test_siglip_second_derivatives(backend, device):
    generator = torch.Generator().manual_seed(2)
    values = _contrastive_values(generator) + [torch.tensor(-1.5, dtype=torch.float64)]
    _assert_second_derivatives(lambda x, y, s, b: leanops.siglip_loss(x, y, s, b, backend=backend),
                               lambda x, y, s, b: oracles.siglip_loss(x, y, s, b), values, _float_for(backend),
                               generator)


@pytest.mark.parametrize("backend,device", CPU_CROSS_ENTROPY)
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, squentropy=True)],
                         ids=["plain", "every_option"])
def test_linear_cross_entropy_second_derivatives(backend, device, options):
    generator = torch.Generator().manual_seed(3)
    tokens, dim, vocabulary = 6, 5, 9
    targets = torch.randint(0, vocabulary, (tokens,), generator=generator)
    targets[1] = -100
    values = [torch.randn(tokens, dim, dtype=torch.float64, generator=generator),
              torch.randn(vocabulary, dim, dtype=torch.float64, generator=generator),
              torch.randn(vocabulary, dtype=torch.float64, generator=generator)]
    _assert_second_derivatives(
        lambda h, w, b: leanops.linear_cross_entropy(h, w, targets, bias=b, backend=backend, **options),
        lambda h, w, b: oracles.linear_cross_entropy(h, w, targets, bias=b, **options), values,
        _float_for(backend), generator)


def test_second_derivatives_pass_gradgradcheck_on_the_reference():
    generator = torch.Generator().manual_seed(4)
    x, y, s = (v.requires_grad_() for v in _contrastive_values(generator, batch=5, dim=3))
    labels = torch.tensor([0, 1, 0, 2, 1])
    assert torch.autograd.gradgradcheck(
        lambda x, y, s: leanops.clip_loss(x, y, s, labels=labels, backend="reference"), (x, y, s))
    assert torch.autograd.gradgradcheck(
        lambda x, y, s: leanops.siglip_loss(x, y, s, 0.5, backend="reference"), (x, y, s))
    h = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 5, -100, 2])
    assert torch.autograd.gradgradcheck(
        lambda h, w: leanops.linear_cross_entropy(h, w, targets, z_loss=0.1, backend="reference"), (h, w))


def test_second_derivatives_refused_by_the_distributed_losses():
    """The distributed losses' backwards run collectives autograd cannot see: create_graph=True raises there."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        generator = torch.Generator().manual_seed(5)
        x, y, s = (v.float().requires_grad_() for v in _contrastive_values(generator))
        for loss in (leanops.clip_loss(x, y, s, distributed="ring", backend="reference"),
                     leanops.siglip_loss(x, y, s, -1.0, distributed="gather", backend="reference")):
            with pytest.raises(SecondDerivativeError, match="no second derivative"):
                torch.autograd.grad(loss, (x, y), create_graph=True)
        h = torch.randn(4, 3, generator=generator, requires_grad=True)
        w = torch.randn(6, 3, generator=generator, requires_grad=True)
        loss = leanops.linear_cross_entropy(h, w, torch.tensor([0, 5, 1, 2]), group=dist.group.WORLD,
                                            backend="reference")
        with pytest.raises(SecondDerivativeError, match="no second derivative"):
            torch.autograd.grad(loss, (h, w), create_graph=True)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# 2. A -inf bias entry (a masked vocabulary slot): the loss and finite gradients of F.cross_entropy.

@pytest.mark.parametrize("backend,device", CPU_CROSS_ENTROPY)
@pytest.mark.parametrize("options", [{}, dict(z_loss=1e-3), dict(softcap=2.0)], ids=["plain", "z_loss", "softcap"])
def test_minus_inf_bias_gives_finite_gradients(backend, device, options):
    require_backend(backend, device)
    generator = torch.Generator().manual_seed(6)
    tokens, dim, vocabulary = 7, 4, 11
    hidden = torch.randn(tokens, dim, dtype=torch.float64, generator=generator)
    weight = torch.randn(vocabulary, dim, dtype=torch.float64, generator=generator)
    bias = torch.randn(vocabulary, dtype=torch.float64, generator=generator)
    bias[[2, 5, 10]] = -math.inf
    targets = torch.tensor([0, 1, 3, -100, 6, 9, 4])
    dtype = torch.float32
    inputs = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    loss = leanops.linear_cross_entropy(*inputs[:2], targets, bias=inputs[2], backend=backend, **options)
    loss.backward()
    expected_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    expected = oracles.linear_cross_entropy(*expected_inputs[:2], targets, bias=expected_inputs[2], **options)
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    for name, got, want in zip(("hidden", "weight", "bias"), inputs, expected_inputs):
        assert bool(torch.isfinite(got.grad).all()), f"{name}: non-finite gradient"
        error = (got.grad.double() - want.grad).abs().max().item()
        assert error <= 1e-5 * max(want.grad.abs().max().item(), 1.0), f"{name}: gradient off by {error:.3g}"
    if "softcap" not in options:
        assert bool((inputs[2].grad[[2, 5, 10]] == 0).all()), "a masked class must get no gradient"


# ---------------------------------------------------------------------------------------------------------------
# 3. Inside torch.compile the value checks cannot raise: the result is NaN, never a plausible number.

@pytest.mark.parametrize("backend,device", CPU_CROSS_ENTROPY)
def test_compiled_out_of_range_targets_give_nan(backend, device):
    require_backend(backend, device)
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, 4, generator=generator, requires_grad=True)
    weight = torch.randn(5, 4, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 1, 7, 2, -3, 4])
    with pytest.raises(ValueError, match="'targets' holds class indices outside"):
        leanops.linear_cross_entropy(hidden, weight, targets, backend=backend)
    compiled = torch.compile(lambda h, w, t: leanops.linear_cross_entropy(h, w, t, backend=backend),
                             fullgraph=True)
    loss = compiled(hidden, weight, targets)
    loss.backward()
    assert math.isnan(loss.item())
    assert bool(torch.isnan(weight.grad).all()), "the bad tokens' NaN must reach the gradients"
    # The same graph with valid targets: finite, equal to eager.
    hidden.grad = weight.grad = None
    good = torch.tensor([0, 1, 4, 2, -100, 4])
    assert torch.allclose(compiled(hidden, weight, good), leanops.linear_cross_entropy(hidden, weight, good,
                                                                                        backend=backend))


@pytest.mark.parametrize("backend,device", CPU_CONTRASTIVE)
@pytest.mark.parametrize("scale", [-1.0, 0.0, math.nan, math.inf], ids=["negative", "zero", "nan", "inf"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_compiled_bad_logit_scale_gives_nan(backend, device, scale, loss):
    require_backend(backend, device)
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(8)
    image = torch.randn(5, 4, generator=generator, requires_grad=True)
    text = torch.randn(5, 4, generator=generator)
    if loss == "clip":
        def run(x, y, s):
            return leanops.clip_loss(x, y, s, backend=backend)
    else:
        def run(x, y, s):
            return leanops.siglip_loss(x, y, s, -1.0, backend=backend)
    bad = torch.tensor(scale)
    with pytest.raises(ValueError, match="'logit_scale' must be finite and positive"):
        run(image, text, bad)
    value = torch.compile(run, fullgraph=True)(image, text, bad)
    value.backward()
    assert math.isnan(value.item())
    assert bool(torch.isnan(image.grad).all())


@pytest.mark.parametrize("backend,device", CPU_CONTRASTIVE)
def test_compiled_bad_logit_bias_gives_nan(backend, device):
    require_backend(backend, device)
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(9)
    image, text = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    compiled = torch.compile(lambda x, y, b: leanops.siglip_loss(x, y, 3.0, b, backend=backend), fullgraph=True)
    assert math.isnan(compiled(image, text, torch.tensor(math.nan)).item())
    assert math.isfinite(compiled(image, text, torch.tensor(-2.0)).item())


# ---------------------------------------------------------------------------------------------------------------
# 6. Smaller silent cases of linear_cross_entropy.

def test_softcap_above_float32_max_refused():
    hidden, weight, targets = torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="'softcap' must be a finite number in"):
        leanops.linear_cross_entropy(hidden, weight, targets, softcap=1e39)
    # The largest accepted softcap behaves as no softcap at these logits.
    capped = leanops.linear_cross_entropy(hidden, weight, targets, softcap=float(torch.finfo(torch.float32).max))
    assert torch.allclose(capped, leanops.linear_cross_entropy(hidden, weight, targets))


@pytest.mark.parametrize("backend,device", CPU_CROSS_ENTROPY)
def test_z_loss_with_huge_lse_stays_finite(backend, device):
    """lse ~ 5e20: lse^2 overflows float32, z_loss * lse^2 (~2.5e37 at z_loss = 1e-4) does not."""
    require_backend(backend, device)
    hidden = torch.tensor([[5e10, 0.0]], requires_grad=True)
    weight = torch.tensor([[1e10, 0.0], [0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([0])
    loss = leanops.linear_cross_entropy(hidden, weight, targets, z_loss=1e-4, backend=backend)
    lse = 5e20  # exactly the target logit: the cross-entropy term is 0
    assert math.isfinite(loss.item())
    assert abs(loss.item() - 1e-4 * lse * lse) <= 1e-5 * 1e-4 * lse * lse
    loss.backward()
    assert bool(torch.isfinite(hidden.grad).all()) and bool(torch.isfinite(weight.grad).all())


@pytest.mark.parametrize("ignore_index", [2 ** 70, -(2 ** 63) - 1])
def test_ignore_index_beyond_int64_refused(ignore_index):
    with pytest.raises(ValueError, match="'ignore_index' must fit in int64"):
        leanops.linear_cross_entropy(torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 2]),
                                     ignore_index=ignore_index)


def test_ignore_index_at_the_int64_limits_works():
    hidden, weight = torch.randn(3, 2), torch.randn(4, 2)
    for ignore_index in (2 ** 63 - 1, -(2 ** 63)):
        targets = torch.tensor([0, ignore_index, 2])
        got = leanops.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index)
        expected = oracles.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index)
        assert torch.allclose(got, expected)



# ---------------------------------------------------------------------------------------------------------------
# 7. auto never slower than plain PyTorch: on the CPU, small logits are built densely (the lean plan's 8 N V D
# FLOPs cannot match plain PyTorch's 6 N V D there); the speed itself is the benchmark's (benchmarks/results/).

def _dense_calls(monkeypatch) -> list:
    calls = []
    dense = leanops.cross_entropy._dense_per_token_loss

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return dense(*args, **kwargs)

    monkeypatch.setattr(leanops.cross_entropy, "_dense_per_token_loss", counting)
    return calls


def test_auto_takes_dense_logits_on_the_cpu_within_the_budget(monkeypatch):
    require_backend("cpu", "cpu")
    monkeypatch.delenv("LEANOPS_BACKEND", raising=False)
    calls = _dense_calls(monkeypatch)
    generator = torch.Generator().manual_seed(10)
    hidden = torch.randn(12, 6, generator=generator, requires_grad=True)
    weight = torch.randn(40, 6, generator=generator, requires_grad=True)
    targets = torch.randint(0, 40, (12,), generator=generator)
    targets[3] = -100
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, squentropy=True)
    dense = leanops.linear_cross_entropy(hidden, weight, targets, **options)
    assert len(calls) == 1
    lean = leanops.linear_cross_entropy(hidden, weight, targets, backend="cpu", **options)
    assert len(calls) == 1, "a backend named explicitly runs its kernels"
    assert torch.allclose(dense, lean, rtol=1e-5)
    assert torch.allclose(dense, oracles.linear_cross_entropy(hidden, weight, targets, **options), rtol=1e-5)
    monkeypatch.setenv("LEANOPS_DENSE_LOGITS_MIB", str(12 * 40 * 4 / 2**20 / 2))  # half the logits: over budget
    leanops.linear_cross_entropy(hidden, weight, targets, **options)
    assert len(calls) == 1, "logits over the budget go to the lean kernels"
    monkeypatch.setenv("LEANOPS_DENSE_LOGITS_MIB", "0")
    leanops.linear_cross_entropy(hidden, weight, targets, **options)
    assert len(calls) == 1


def test_dense_logits_never_chosen_on_a_gpu():
    assert leanops.plans.dense_logits_budget_bytes("cuda") == 0
    assert not leanops.plans.dense_logits_chosen("cuda", 1, 1)


def test_dense_logits_budget_must_be_a_number(monkeypatch):
    monkeypatch.setenv("LEANOPS_DENSE_LOGITS_MIB", "lots")
    with pytest.raises(ValueError, match="LEANOPS_DENSE_LOGITS_MIB must be a number of MiB"):
        leanops.plans.dense_logits_budget_bytes("cpu")
