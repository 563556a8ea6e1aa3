"""The machinery behind every op family's declaration: operators, providers, the choice of a provider, and the
torch.library registrations (Python providers' operators, fake kernels, autograd) derived from a declaration.

A family (``leanops/ops/<family>.py``) is declared once, as an ``OpFamily``:

- its ``Operator``s: each schema (exactly csrc/ops.cpp's, which tests/test_registry.py checks), its fake kernel
  (output shapes, for torch.compile and meta tensors) and, for a differentiable primitive, its ``Autograd``;
- its ``Provider``s: ``reference`` (plain PyTorch, float64-capable, chunked: python/leanops/reference/<family>.py),
  ``cpu`` and ``cuda`` (the C++ kernels of leanops._C) and ``triton`` (triton_kernels/<family>.py), each with the
  dtypes it serves;
- ``preference``: the order in which ``backend="auto"`` tries the providers, per device type, or per device type
  and dtype where a measurement says so (a key "cpu:float16" is looked up before "cpu").

``OpFamily.resolve`` returns the provider that serves a call, or raises ``BackendUnavailableError`` saying why each
candidate cannot; ``provider.operators`` holds its callable operators (``provider.operators.clip_forward(...)``).
Namespace strings live here and nowhere else: the C++ kernels register in ``leanops``, the Triton kernels in
``leanops_triton``, the reference in ``leanops_reference``, and composite operators built over any provider (the
CLIP loss's positive terms) in ``leanops_loss``.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import _extension, backends
from ..backends import AUTO, KERNEL_DTYPES, BackendUnavailableError
# The dtype of the primitives' statistics and float32 gradients: float64 for float64 inputs, else float32.
from ..reference._chunks import accumulation_dtype as statistics_dtype  # noqa: F401  - for the families' fakes

REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
# The C++ kernels (cpu and cuda) share one namespace: the dispatcher picks the kernel by the tensors' device.
NAMESPACES = {"reference": "leanops_reference", "cpu": "leanops", "cuda": "leanops", "triton": "leanops_triton"}
COMPOSITE_NAMESPACE = "leanops_loss"
# The dispatch key under which a C++ provider's kernels register (a partial build may lack some).
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@dataclass(frozen=True)
class Autograd:
    """The backward of a differentiable primitive, in terms of any provider's operators.

    ``setup_context(ctx, inputs, output)`` saves what the backward needs; ``backward(operators, ctx, *grads)``
    returns one gradient per input, ``operators`` being the serving provider's (so the backward runs on the same
    provider as the forward).

    ``formula(ctx)``: the primitive's outputs recomputed from the saved inputs in plain, differentiable PyTorch
    (dense: O(B^2) / O(N V) memory), returned with the inputs they depend on, as (outputs, inputs). A backward
    asked for a differentiable result (``create_graph=True``: grad mode is on inside the backward) differentiates
    it with torch autograd instead of calling the kernels, whose gradients have no gradient of their own: second
    derivatives are then right on every provider, at the dense formula's memory. Without a formula such a backward
    raises (``SecondDerivativeError``) rather than return gradients that silently lack their own graph."""
    setup_context: Callable
    backward: Callable
    formula: Callable | None = None


class SecondDerivativeError(RuntimeError):
    """A second derivative was asked of an operator that cannot give one."""


def refuse_second_derivative(name: str) -> None:
    """In a backward that cannot give a differentiable result: raise when one is asked for (grad mode is on inside
    a backward exactly when the caller passed create_graph=True)."""
    if torch.is_grad_enabled():
        raise SecondDerivativeError(
            f"leanops: {name} has no second derivative (backward(create_graph=True) / torch.autograd.grad("
            f"create_graph=True) through it); compute the first-order gradients without create_graph")


def differentiable_backward(name: str, autograd: Autograd, ctx, grads) -> tuple:
    """The gradients of `autograd.formula`'s outputs, differentiable (the ``create_graph=True`` backward): one per
    input of the primitive (None where it has none or needs none)."""
    if autograd.formula is None:
        refuse_second_derivative(name)
    outputs, inputs = autograd.formula(ctx)
    wanted = [index for index, tensor in enumerate(inputs)
              if isinstance(tensor, torch.Tensor) and ctx.needs_input_grad[index] and tensor.requires_grad]
    pairs = [(output, grad) for output, grad in zip(outputs, grads) if grad is not None and output.requires_grad]
    result = [None] * len(ctx.needs_input_grad)
    if wanted and pairs:
        gradients = torch.autograd.grad([output for output, _ in pairs], [inputs[index] for index in wanted],
                                        [grad.to(output.dtype) for output, grad in pairs], create_graph=True,
                                        allow_unused=True)
        for index, gradient in zip(wanted, gradients):
            result[index] = torch.zeros_like(inputs[index]) if gradient is None else gradient
    return tuple(result)


@dataclass(frozen=True)
class Operator:
    """One operator of a family: ``schema`` is "name(arguments) -> results" in torch's schema language."""
    schema: str
    fake: Callable | None = None
    autograd: Autograd | None = None

    @property
    def name(self) -> str:
        return self.schema.split("(", 1)[0]

    @property
    def signature(self) -> str:
        return self.schema[len(self.name):]

    @property
    def mutated_arguments(self) -> tuple[str, ...]:
        """Names of the arguments the operator writes to (annotated ``(a!)`` in the schema)."""
        return tuple(re.findall(r"\(\w!\)(?:\[\])?\??\s+(\w+)", self.signature))


@dataclass(frozen=True)
class Provider:
    """One implementation of a family's operators.

    backend: "reference", "cpu", "cuda" or "triton". dtypes: what it serves. module: for a Python provider, the
    module whose function of each operator's name implements it (imported on first use, so defining the Triton
    operators never imports triton). wrapped: whether those functions are wrapped as torch.library operators (the
    MCF reference is called as plain functions: it keeps torch autograd and its in-place checks)."""
    backend: str
    dtypes: tuple
    module: str | None = None
    wrapped: bool = True

    @property
    def namespace(self) -> str:
        return NAMESPACES[self.backend]

    @property
    def operators(self):
        """The callable operators: ``torch.ops.<namespace>``, or the plain module where not wrapped (imported when
        the family registers, so that torch.compile traces a dictionary lookup, not an import)."""
        if not self.wrapped:
            return _PLAIN_MODULES.get(self.module) or _import_plain_module(self.module)
        return getattr(torch.ops, self.namespace)

    @property
    def compiled(self) -> bool:
        return self.backend in DISPATCH_KEYS


@dataclass
class OpFamily:
    """A family's whole declaration (module docstring)."""
    name: str
    description: str
    operators: tuple[Operator, ...]
    providers: tuple[Provider, ...]
    preference: dict[str, tuple[str, ...]]
    _registered: bool = field(default=False, repr=False)
    # backend -> why its code is missing (None: built); filled when the family registers, since the dispatcher and
    # import-system queries behind it cannot be traced by torch.compile.
    _build_reasons: dict = field(default_factory=dict, repr=False)

    # -----------------------------------------------------------------------------------------------------------
    # Which provider serves a call.

    def provider(self, backend: str) -> Provider:
        for provider in self.providers:
            if provider.backend == backend:
                return provider
        raise KeyError(f"family {self.name!r} has no provider {backend!r}")

    def built(self, provider: Provider) -> str | None:
        """Why `provider`'s code is missing from this installation (independent of any device), or None."""
        if provider.backend not in self._build_reasons:
            self._build_reasons[provider.backend] = self._build_reason(provider)
        return self._build_reasons[provider.backend]

    def _build_reason(self, provider: Provider) -> str | None:
        generic = backends.build_reason(provider.backend)
        if generic is not None:
            return generic
        if provider.compiled:
            operator = self.operators[0].name
            if not (hasattr(torch.ops.leanops, operator) and torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"leanops::{operator}", DISPATCH_KEYS[provider.backend])):
                return (f"this build of leanops._C has no {provider.backend} kernels for {self.name} (rebuild: "
                        f"pip install --no-build-isolation -e .)")
        return None

    def unavailable_reason(self, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        """Why provider `backend` cannot serve tensors of this device (and dtype, if given), or None when it can."""
        provider = self.provider(backend)
        # The build check is cached (self.built): only the device is looked at per call.
        reason = self.built(provider) or backends.device_reason(backend, device)
        if reason is None and dtype is not None and dtype not in provider.dtypes:
            reason = f"it serves {', '.join(str(d) for d in provider.dtypes)}, not {dtype}"
        return reason

    def resolve(self, op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Provider:
        """The provider that serves `op` (the public name, for messages) on tensors of this device and dtype.

        ``auto`` (or what ``LEANOPS_BACKEND`` names) takes the first provider that can serve of
        ``preference["<device type>:<dtype>"]`` where declared, else of ``preference[device.type]``; a named backend
        must serve or the error says why. ValueError for an unknown name."""
        if not isinstance(backend, str):
            raise TypeError(f"{op}: argument 'backend' must be a string, got {type(backend).__name__}")
        if backend == AUTO:
            backend = backends.default_backend()
        if backend == AUTO:
            reasons = []
            dtype_key = f"{device.type}:{str(dtype).removeprefix('torch.')}"
            order = self.preference.get(dtype_key) or self.preference.get(device.type, ("reference",))
            for candidate in order:
                reason = self.unavailable_reason(candidate, device, dtype)
                if reason is None:
                    return self.provider(candidate)
                reasons.append(f"{candidate}: {reason}")
            raise BackendUnavailableError(f"{op}: no backend serves {dtype} tensors on {device}: "
                                          + "; ".join(reasons))
        if backend not in backends.BACKENDS:
            raise ValueError(f"{op}: argument 'backend' must be one of {(AUTO,) + backends.BACKENDS}, got {backend!r}")
        reason = self.unavailable_reason(backend, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot serve this call: {reason}")
        return self.provider(backend)

    def status(self, device_type: str) -> list[dict]:
        """Per provider: built, usable on `device_type`, and why not (``leanops info``)."""
        rows = []
        for provider in self.providers:
            built = self.built(provider)
            reason = self.unavailable_reason(provider.backend, torch.device(device_type))
            if reason is None and device_type == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA device visible"
            rows.append({"family": self.name, "backend": provider.backend, "device_type": device_type,
                         "built": built is None, "usable": reason is None, "reason": reason})
        return rows

    # -----------------------------------------------------------------------------------------------------------
    # torch.library registrations, derived from the declaration.

    def register(self) -> OpFamily:
        """Define the Python providers' operators and register every fake kernel and autograd formula, for every
        provider whose operators exist (the C++ ones only when leanops._C loaded and defines them). Idempotent."""
        if self._registered:
            return self
        self._registered = True
        namespaces = []
        for provider in self.providers:
            self.built(provider)
            if not provider.wrapped:
                _import_plain_module(provider.module)
            if provider.compiled or not provider.wrapped or provider.namespace in namespaces:
                continue
            namespaces.append(provider.namespace)
            for operator in self.operators:
                _define_python_operator(provider, operator)
        if _extension.extension_loaded() and hasattr(torch.ops.leanops, self.operators[0].name):
            namespaces.append(NAMESPACES["cpu"])
        for namespace in namespaces:
            operators = getattr(torch.ops, namespace)
            for operator in self.operators:
                qualified = f"{namespace}::{operator.name}"
                if operator.fake is not None:
                    torch.library.register_fake(qualified)(operator.fake)
                if operator.autograd is not None:
                    torch.library.register_autograd(qualified, _bind_backward(qualified, operator.autograd, operators),
                                                    setup_context=operator.autograd.setup_context)
        return self


# The modules of the unwrapped providers, by name (see Provider.operators).
_PLAIN_MODULES: dict = {}


def _import_plain_module(name: str):
    _PLAIN_MODULES[name] = importlib.import_module(name)
    return _PLAIN_MODULES[name]


def _define_python_operator(provider: Provider, operator: Operator) -> None:
    """``<namespace>::<name>`` calling `provider.module`'s function of that name (imported on the first call)."""
    module_name, name = provider.module, operator.name

    def kernel(*args):
        return getattr(importlib.import_module(module_name), name)(*args)

    torch.library.custom_op(f"{provider.namespace}::{name}", kernel, mutates_args=operator.mutated_arguments,
                            schema=operator.signature)


def _bind_backward(name: str, autograd: Autograd, operators):
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: the gradients must carry their own graph
            return differentiable_backward(name, autograd, ctx, grads)
        return autograd.backward(operators, ctx, *grads)  # composite operators get None: they name their provider

    return backward


def composite_operator(schema: str, implementation: Callable, fake: Callable, autograd: Autograd):
    """An operator built over any provider's primitives (its arguments name the provider's backend), defined in the
    composite namespace with its fake kernel and autograd; returns the callable operator."""
    operator = Operator(schema, fake, autograd)
    qualified = f"{COMPOSITE_NAMESPACE}::{operator.name}"
    torch.library.custom_op(qualified, implementation, mutates_args=operator.mutated_arguments,
                            schema=operator.signature)
    torch.library.register_fake(qualified)(fake)
    torch.library.register_autograd(qualified, _bind_backward(qualified, autograd, None),
                                    setup_context=autograd.setup_context)
    return getattr(getattr(torch.ops, COMPOSITE_NAMESPACE), operator.name)


def standard_providers(family: str, kernel_dtypes: tuple = KERNEL_DTYPES,
                       reference_dtypes: tuple = REFERENCE_DTYPES, reference_wrapped: bool = True,
                       ) -> tuple[Provider, ...]:
    """The four providers of a family whose modules follow the layout: python/leanops/reference/<family>.py,
    csrc/{cpu,cuda}/<family>.*, triton_kernels/<family>.py."""
    return (Provider("reference", reference_dtypes, f"leanops.reference.{family}", reference_wrapped),
            Provider("cpu", kernel_dtypes),
            Provider("cuda", kernel_dtypes),
            Provider("triton", kernel_dtypes, f"leanops.triton_kernels.{family}"))

