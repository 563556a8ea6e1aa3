"""The op families' declarations (leanops.ops): schemas equal to the C++ ones, every operator of every provider
through torch.library.opcheck, the choice of a provider (auto, named, the reasons when none serves), `leanops info`
from the declarations, and no operator looked up by a namespace string outside the registry."""
import pathlib
import re

import pytest
import torch

import leanops
from helpers import require_backend
from leanops import backends, info, ops
from leanops.ops.registry import COMPOSITE_NAMESPACE, NAMESPACES, OpFamily, Operator, Provider, standard_providers

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (family, provider backend, device): every provider of every family; those this machine cannot run are skipped.
DEVICES = ("cpu", "cuda")
CASES = [pytest.param(family, backend, device, id=f"{family.name}-{backend}-{device}",
                      marks=([pytest.mark.gpu] if device == "cuda" else [])
                      + ([pytest.mark.triton] if backend == "triton" else []))
         for family in ops.FAMILIES for backend in backends.BACKENDS for device in DEVICES]


def _require(family: OpFamily, backend: str, device: str) -> None:
    require_backend(backend, device)
    reason = family.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"{family.name}: {reason}")


# ---------------------------------------------------------------------------------------------------------------
# Sample arguments for every operator of every family, small and awkward (B and D not multiples of any block).

def _mcf_samples(device):
    generator = torch.Generator().manual_seed(0)
    hi = torch.randn(37, generator=generator).to(torch.bfloat16).to(device)
    lo = (torch.randn(37, generator=generator) * 1e-3).to(torch.bfloat16).to(device)
    b_hi = torch.ones((), dtype=torch.bfloat16, device=device)
    b_lo = torch.full((), -0.0009765625, dtype=torch.bfloat16, device=device)
    x = torch.randn(5, 7, generator=generator).to(device)
    return {"two_sum": [(hi, lo)], "fast_two_sum": [(hi, lo)], "two_prod": [(hi.float(), lo.float())],
            "grow": [(hi, lo, lo)], "grow_": [(hi.clone(), lo.clone(), lo)], "scale": [(hi, lo, b_hi, b_lo)],
            "split": [(x, torch.float16)], "merge": [(hi, lo)]}


def _contrastive_samples(device):
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.randn(19, 7, generator=generator).to(device) for _ in range(2))
    scale = (torch.rand(19, generator=generator) * 5 + 1).to(device)
    groups = torch.randint(0, 6, (19,), generator=generator).to(device)
    weight = torch.rand(19, generator=generator).to(device)
    s, b = torch.tensor(3.0, device=device), torch.tensor(-2.0, device=device)
    row_lse, col_lse = ops.CONTRASTIVE.provider("reference").operators.clip_forward(image, text, scale)
    learnable = image.clone().requires_grad_(True)
    return {"clip_forward": [(image, text, scale), (learnable, text, scale.clone().requires_grad_(True))],
            "clip_backward": [(image, text, scale, row_lse, col_lse, weight, weight.flip(0))],
            "siglip_forward": [(image, text, s, b, groups), (learnable, text, s.clone().requires_grad_(True), b,
                                                             groups)],
            "siglip_backward": [(image, text, s, b, groups, weight)]}


def _cross_entropy_samples(device):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 7, generator=generator).to(device)
    weight = torch.randn(11, 7, generator=generator).to(device)
    bias = torch.randn(11, generator=generator).to(device)
    targets = torch.randint(-1, 11, (13,), generator=generator).to(device)
    statistics = ops.CROSS_ENTROPY.provider("reference").operators.linear_ce_forward(hidden, weight, bias, targets,
                                                                                     0.0)
    grads = [torch.rand(13, generator=generator).to(device) for _ in range(4)]
    return {"linear_ce_forward": [(hidden, weight, bias, targets, 0.0), (hidden, weight, bias[:0], targets, 5.0),
                                  (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True),
                                   bias.clone().requires_grad_(True), targets, 5.0)],
            "linear_ce_backward": [(hidden, weight, bias, targets, 5.0, statistics[0], *grads)]}


def _collage_samples(device):
    generator = torch.Generator().manual_seed(0)

    def tensors(scale=1.0):
        return [(scale * torch.randn(shape, generator=generator)).bfloat16().to(device) for shape in ((7,), (2, 3))]

    def step(plus, metrics):
        params, params_lo, exp_avgs, grads = tensors(), tensors(1e-3), tensors(0.1), tensors()
        exp_avg_sqs = [t.abs() for t in tensors(0.01)]
        exp_avg_sqs_lo = [t.abs() for t in tensors(1e-4)] if plus else []
        return (params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo, grads, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.1,
                0.001, plus, torch.zeros(4, dtype=torch.float64, device=device) if metrics else None)

    return {"collage_adamw_step_": [step(False, True), step(True, True), step(True, False)]}


def _frugal_samples(device):
    generator = torch.Generator().manual_seed(0)

    def normal(*shape):
        return torch.randn(shape, generator=generator).to(device)

    empty, positions = torch.empty(0, device=device), torch.tensor([-1, 0, -1, 1], dtype=torch.int32, device=device)
    params = [normal(3, 5), normal(6), normal(3, 4)]
    moments = [normal(3, 5).abs(), empty, normal(3, 2).abs()]
    return {"frugal_split_step_": [
        (params, [], [m.clone() for m in moments], [m.clone() for m in moments], [normal(3, 5), normal(6),
                                                                                  normal(3, 4)],
         [empty, empty, positions], [empty, normal(6), empty], [0, 1, 2], [1e-2, 0.0, 2e-2], [0.5, 1.0, 0.4], 0.9,
         0.999, 1e-8, 0.999, 1e-3, 0)]}


SAMPLES = {"mcf": _mcf_samples, "contrastive": _contrastive_samples, "cross_entropy": _cross_entropy_samples,
           "collage": _collage_samples, "frugal": _frugal_samples}


def test_every_operator_has_samples():
    for family in ops.FAMILIES:
        assert set(SAMPLES[family.name]("cpu")) == {operator.name for operator in family.operators}, family.name


@pytest.mark.parametrize("family,backend,device", CASES)
def test_opcheck_every_operator(family, backend, device):
    """Schema, fake kernel, aliasing and autograd registration of every operator this provider has."""
    _require(family, backend, device)
    provider = family.provider(backend)
    if not provider.wrapped:
        pytest.skip(f"{family.name}'s {backend} provider is plain functions, not torch.library operators")
    for name, samples in SAMPLES[family.name](device).items():
        for args in samples:
            torch.library.opcheck(getattr(provider.operators, name).default, args)


# ---------------------------------------------------------------------------------------------------------------
# The declarations themselves.

@pytest.mark.skipif(not leanops._extension.extension_loaded(), reason="leanops._C is not built here")
@pytest.mark.parametrize("family", ops.FAMILIES, ids=lambda family: family.name)
def test_cpp_schemas_equal_the_declared_ones(family):
    for operator in family.operators:
        declared = torch._C.parse_schema(f"leanops::{operator.schema}")
        assert str(getattr(torch.ops.leanops, operator.name).default._schema) == str(declared), operator.name


@pytest.mark.parametrize("family", ops.FAMILIES, ids=lambda family: family.name)
def test_every_family_has_the_four_providers_and_a_reference_last(family):
    assert {provider.backend for provider in family.providers} == set(backends.BACKENDS)
    reference = family.provider("reference")
    assert set(reference.dtypes) >= set(family.provider("cpu").dtypes)
    for device_type, order in family.preference.items():
        assert order[-1] == "reference", (device_type, order)
        assert set(order) <= set(backends.BACKENDS)


def test_mutated_arguments_come_from_the_schema():
    assert ops.MCF.operators[4].mutated_arguments == ("hi", "lo")
    assert ops.COLLAGE.operators[0].mutated_arguments == ("params", "params_lo", "exp_avgs", "exp_avg_sqs",
                                                         "exp_avg_sqs_lo", "metrics")
    assert ops.FRUGAL.operators[0].mutated_arguments == ("params", "params_lo", "exp_avgs", "exp_avg_sqs")
    assert ops.CONTRASTIVE.operators[0].mutated_arguments == ()


def test_no_operator_is_looked_up_by_a_namespace_string_outside_the_registry():
    """Only python/leanops/ops/registry.py names the torch.ops namespaces; everything else asks a family."""
    namespaces = "|".join(sorted(set(NAMESPACES.values()) | {COMPOSITE_NAMESPACE}))
    pattern = re.compile(rf"getattr\(torch\.ops|torch\.ops\.leanops|\b({namespaces})::\w|"
                         r"[\"'](leanops_reference|leanops_triton|leanops_loss)[\"']")
    allowed = {ROOT / "python/leanops/ops/registry.py", pathlib.Path(__file__).resolve()}
    offenders = []
    for folder in ("python", "triton_kernels", "benchmarks", "tests", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in allowed:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------------------------------------------------------
# Choosing a provider.

def test_auto_picks_the_cpu_kernels_and_float64_the_reference():
    cpu = torch.device("cpu")
    for family in ops.FAMILIES:
        kernel_dtype = family.provider("cpu").dtypes[0]
        expected = "cpu" if family.unavailable_reason("cpu", cpu) is None else "reference"
        assert family.resolve("op", "auto", cpu, kernel_dtype).backend == expected
    for family in (ops.MCF, ops.CONTRASTIVE, ops.CROSS_ENTROPY, ops.FRUGAL):
        assert family.resolve("op", "auto", cpu, torch.float64).backend == "reference"


def test_leanops_backend_sets_the_default(monkeypatch):
    a = torch.randn(5).bfloat16()
    monkeypatch.setenv("LEANOPS_BACKEND", "reference")
    assert ops.MCF.resolve("op", "auto", a.device, a.dtype).backend == "reference"
    monkeypatch.setenv("LEANOPS_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(leanops.BackendUnavailableError, match="backend 'cuda'"):
            leanops.mcf.two_sum(a, a)
    monkeypatch.setenv("LEANOPS_BACKEND", "quantum")
    with pytest.raises(ValueError, match="LEANOPS_BACKEND='quantum'"):
        leanops.mcf.two_sum(a, a)


def test_a_named_backend_that_cannot_serve_says_why():
    with pytest.raises(leanops.BackendUnavailableError, match=r"leanops.mcf.two_sum: backend 'cpu' .*float64"):
        leanops.mcf.two_sum(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), backend="cpu")
    with pytest.raises(ValueError, match="argument 'backend' must be one of"):
        ops.MCF.resolve("op", "fastest", torch.device("cpu"), torch.float32)
    with pytest.raises(TypeError, match="argument 'backend' must be a string"):
        ops.MCF.resolve("op", None, torch.device("cpu"), torch.float32)


def test_auto_never_falls_back_silently_when_no_provider_serves():
    """A family whose `auto` order has no provider for the call names every candidate and its reason."""
    family = OpFamily("toy", "a family without a reference in its order",
                      (Operator("toy_op(Tensor a) -> Tensor"),), standard_providers("toy"),
                      {"cpu": ("cpu",)})
    with pytest.raises(leanops.BackendUnavailableError, match=r"op: no backend serves torch.float64 .* cpu: "):
        family.resolve("op", "auto", torch.device("cpu"), torch.float64)


def test_a_partial_build_reports_the_missing_kernels(monkeypatch):
    """A C++ provider counts as built only where leanops._C registered the family's kernels."""
    if not leanops._extension.extension_loaded():
        pytest.skip("leanops._C is not built here")
    family = OpFamily("toy", "kernels this build lacks", (Operator("no_such_operator(Tensor a) -> Tensor"),),
                      (Provider("reference", (torch.float32,), "leanops.reference.mcf", False),
                       Provider("cpu", (torch.float32,))), {"cpu": ("cpu", "reference")})
    assert "has no cpu kernels for toy" in family.unavailable_reason("cpu", torch.device("cpu"))
    assert family.resolve("op", "auto", torch.device("cpu"), torch.float32).backend == "reference"


# ---------------------------------------------------------------------------------------------------------------
# leanops info, from the same declarations.

def test_info_lists_every_provider_of_every_family():
    table = info.collect()["backends"]
    assert {(row["family"], row["backend"], row["device_type"]) for row in table} == {
        (family.name, backend, device) for family in ops.FAMILIES for backend in backends.BACKENDS
        for device in DEVICES}
    for row in table:
        assert row["usable"] == (row["reason"] is None)
        expected = ops.FAMILIES[[f.name for f in ops.FAMILIES].index(row["family"])].unavailable_reason(
            row["backend"], torch.device(row["device_type"]))
        if row["device_type"] == "cpu":
            assert row["reason"] == expected
    text = info.format_info(info.collect())
    for family in ops.FAMILIES:
        assert family.name in text


def test_a_dtype_specific_preference_comes_first():
    """MCF and FRUGAL in float16 on the CPU: auto takes the reference (measured faster there; the same bits),
    and every other dtype the C++ kernels."""
    for family in (ops.MCF, ops.FRUGAL):
        assert family.resolve("op", "auto", torch.device("cpu"), torch.float16).backend == "reference"
        if family.unavailable_reason("cpu", torch.device("cpu"), torch.float32) is None:
            assert family.resolve("op", "auto", torch.device("cpu"), torch.float32).backend == "cpu"
    assert ops.CONTRASTIVE.resolve("op", "reference", torch.device("cpu"), torch.float16).backend == "reference"
