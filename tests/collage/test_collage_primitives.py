"""Collage AdamW's fused multi-tensor step ``collage_adamw_step_`` on every kernel provider of ops.COLLAGE (the C++
CPU kernel csrc/cpu/collage.cpp, the CUDA kernel csrc/cuda/collage.cu, the Triton kernel triton_kernels/collage.py:
under Triton's interpreter on CPU tensors on a machine without a GPU), against the oracle, the reference provider
(python/leanops/reference/collage.py): the same bits for every state tensor, step after step, and the telemetry
within summation tolerance (relative 1e-5; the counts exactly).

The same cases for every provider: lists with awkward sizes (1, 3, 1000, 4097, a 2-D tensor, an empty tensor, one of
several chunks of every kernel), 5 steps in a row with fresh random gradients, bfloat16 and float16, light and plus,
with and without weight decay; float16 low parts and moments reach into the subnormals. The square root is where a
backend would most easily depart from the contract: the kernels take an IEEE sqrt, and so does the reference
(reference.collage.sqrt_rn; torch's own float32 CPU sqrt is not always correctly rounded), so float16's rounding
ties of delta come out the same. Then what is particular to one provider: the CPU kernel's thread count, the CUDA
kernel's chunk table, side stream and second device, each kernel's argument checks.
"""
import pytest
import torch

from helpers import interpreted, provider_cases, provider_grid
from leanops import ops

KERNELS = provider_cases(ops.COLLAGE, backends_=("cpu", "cuda", "triton"))
CPP_KERNELS = provider_cases(ops.COLLAGE, backends_=("cpu", "cuda"))
CPU_KERNEL = provider_cases(ops.COLLAGE, backends_=("cpu",))
CUDA_KERNEL = provider_cases(ops.COLLAGE, backends_=("cuda",))
TRITON_KERNEL = provider_cases(ops.COLLAGE, backends_=("triton",))
ORACLE = ops.COLLAGE.provider("reference").operators.collage_adamw_step_

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
MODES = [pytest.param(False, id="light"), pytest.param(True, id="plus")]
# 20000: two chunks of the C++ kernels' 16384, three of the Triton interpreter's 8192 (4097: three of the Triton
# GPU kernel's 2048); 70000: five chunks of the CUDA kernel's 16384.
AWKWARD_SIZES = [1, 3, 1000, 4097, (37, 53), 0, 20000]
SEVERAL_CHUNKS = {"cuda": [70_000]}
LISTS = ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "exp_avg_sqs_lo")


def kernel(backend: str):
    return ops.COLLAGE.provider(backend).operators.collage_adamw_step_


# ---------------------------------------------------------------------------------------------------------------
# Inputs.

def _spread(shape, generator, low_exponent, high_exponent):
    """float32 values with random signs and log-uniform magnitudes in [10^low, 10^high)."""
    exponent = torch.empty(shape).uniform_(low_exponent, high_exponent, generator=generator)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return sign * 10.0 ** exponent


def _shape(size):
    return size if isinstance(size, tuple) else (size,)


def make_state(sizes, dtype, plus, seed=0, device="cpu"):
    """Optimizer state after some steps: (params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo) lists, with
    params of mixed magnitudes, params_lo within half an ulp of params, signed first moments, second moments
    v >= m^2 and, in plus mode, second-moment low parts (float16 low parts and moments reach into the subnormals)."""
    generator = torch.Generator().manual_seed(seed)
    half_ulp = 2.0 ** -9 if dtype == torch.bfloat16 else 2.0 ** -12
    # v >= m^2, as Adam's moments are; float16's m^2 stays above its smallest subnormal, so that delta stays finite.
    m_low = -5 if dtype == torch.bfloat16 else -3
    params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo = [], [], [], [], []
    for size in sizes:
        shape = _shape(size)
        theta = _spread(shape, generator, -3, 1).to(dtype)
        params.append(theta)
        params_lo.append((theta.float() * half_ulp * (2 * torch.rand(shape, generator=generator) - 1)).to(dtype))
        m = _spread(shape, generator, m_low, -1)
        exp_avgs.append(m.to(dtype))
        v = (m.square() * _spread(shape, generator, 0, 2).abs()).to(dtype)
        exp_avg_sqs.append(v)
        if plus:
            exp_avg_sqs_lo.append((v.float() * half_ulp * (2 * torch.rand(shape, generator=generator) - 1)).to(dtype))
    state = (params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo)
    return tuple([t.to(device) for t in lst] for lst in state)


def make_grads(sizes, dtype, generator, device="cpu"):
    """Fresh gradients, magnitudes spread over 10^-5 .. 10^0 (float16: 10^-3 .. 10^0)."""
    low = -5 if dtype == torch.bfloat16 else -3
    return [_spread(_shape(size), generator, low, 0).to(dtype).to(device) for size in sizes]


def clone_state(state, device=None):
    return tuple([t.to(device or t.device, copy=True) for t in lst] for lst in state)


def zero_metrics(device):
    return torch.zeros(4, dtype=torch.float64, device=device)


HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def step_args(state, grads, step, plus, weight_decay, metrics, lr=None, beta1=None, beta2=None, eps=None):
    """The op's arguments for step number `step` (bias corrections 1 - beta^step, in float64)."""
    lr = HYPER["lr"] if lr is None else lr
    beta1 = HYPER["beta1"] if beta1 is None else beta1
    beta2 = HYPER["beta2"] if beta2 is None else beta2
    eps = HYPER["eps"] if eps is None else eps
    return (*state, grads, lr, beta1, beta2, eps, weight_decay, 1.0 - beta1 ** step, 1.0 - beta2 ** step, plus,
            metrics)


def run_steps(op, state, sizes, dtype, plus, weight_decay, steps, seed=1, metrics=None, device="cpu",
              grad_transform=None, **hyper):
    """`steps` steps in a row of `op` on `state` (in place), fresh gradients each step (the same for any op given
    the same seed), each passed through grad_transform if given."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        grads = make_grads(sizes, dtype, generator, device)
        if grad_transform is not None:
            grads = [grad_transform(g) for g in grads]
        op(*step_args(state, grads, step, plus, weight_decay, metrics, **hyper))
    return state


def assert_same_bits(actual, expected):
    for name, actual_list, expected_list in zip(LISTS, actual, expected):
        assert len(actual_list) == len(expected_list)
        for index, (a, e) in enumerate(zip(actual_list, expected_list)):
            assert a.dtype == e.dtype and a.shape == e.shape
            # Compare bits: equal values with different bits (+0 / -0) would pass torch.equal.
            a_bits, e_bits = a.view(torch.int16).cpu(), e.view(torch.int16).cpu()
            mismatches = int((a_bits != e_bits).sum())
            assert mismatches == 0, f"{name}[{index}]: {mismatches} of {a.numel()} elements differ"


def assert_metrics_close(actual, expected):
    actual, expected = actual.cpu(), expected.cpu()
    assert torch.isfinite(expected).all(), f"the test's inputs overflowed: {expected}"
    torch.testing.assert_close(actual[:2], expected[:2], rtol=1e-5, atol=0.0)
    assert actual[2].item() == expected[2].item(), "lost-update counts differ"
    assert actual[3].item() == expected[3].item(), "element counts differ"


def against_the_oracle(backend, device, sizes, dtype, plus, weight_decay, steps, state=None, metrics=True,
                       seed=0, **hyper):
    """`steps` steps of the provider and of the oracle from the same state (make_state(seed) unless given) with
    the same gradients, on `device`: the provider's state and telemetry (None without metrics)."""
    state = make_state(sizes, dtype, plus, seed=seed) if state is None else state
    expected, actual = clone_state(state, device), clone_state(state, device)
    expected_metrics = zero_metrics(device) if metrics else None
    actual_metrics = zero_metrics(device) if metrics else None
    run_steps(ORACLE, expected, sizes, dtype, plus, weight_decay, steps, metrics=expected_metrics, device=device,
              **hyper)
    run_steps(kernel(backend), actual, sizes, dtype, plus, weight_decay, steps, metrics=actual_metrics,
              device=device, **hyper)
    assert_same_bits(actual, expected)
    if metrics:
        assert_metrics_close(actual_metrics, expected_metrics)
    return actual, actual_metrics


def _misaligned_copy(t):
    """A contiguous copy of t whose data starts 2 bytes past a 16-byte boundary."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


# ---------------------------------------------------------------------------------------------------------------
# Every provider against the oracle.

# dtype x mode x weight decay. Under Triton's interpreter the diagonal (each dtype and mode once, each weight decay
# twice) is quick and the rest slow: every variant of the kernel (storage, mode, with telemetry) stays in the quick
# run.
FIVE_STEP_POINTS = [pytest.param(dtype, plus, weight_decay, id=f"{dtype_id}-{mode_id}-wd{weight_decay}")
                    for dtype, dtype_id in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))
                    for plus, mode_id in ((False, "light"), (True, "plus"))
                    for weight_decay in (0.0, 0.1)]


def _off_the_diagonal(backend, device, dtype, plus, weight_decay):
    """The interpreter's cases but four: those with weight decay exactly when one of float16 and plus."""
    return interpreted(backend, device) and (weight_decay > 0) != ((dtype == torch.float16) != plus)


@pytest.mark.parametrize("backend,device,dtype,plus,weight_decay",
                         provider_grid(KERNELS, FIVE_STEP_POINTS, slow=_off_the_diagonal))
@pytest.mark.gpu_check
def test_five_steps_match_the_oracle_bit_for_bit(backend, device, dtype, plus, weight_decay):
    sizes = AWKWARD_SIZES + SEVERAL_CHUNKS.get(backend, [])
    state = make_state(sizes, dtype, plus)
    actual, metrics = against_the_oracle(backend, device, sizes, dtype, plus, weight_decay, steps=5, state=state)
    assert metrics[3].item() == 5 * sum(t.numel() for t in state[0])
    # The state moved: a step that did nothing would match a broken oracle too.
    assert not torch.equal(actual[0][2].cpu(), state[0][2]) and not torch.equal(actual[2][2].cpu(), state[2][2])


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plus", MODES)
def test_without_metrics_the_state_is_the_same(backend, device, dtype, plus):
    """metrics=None (the kernels' path without telemetry) gives the oracle's bits too."""
    against_the_oracle(backend, device, [5000, 17], dtype, plus, 0.01, steps=2, metrics=False)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hyper", [
    dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6),
    dict(lr=3e-5, beta1=0.0, beta2=0.9999, eps=1e-12),
    # float64 -> F through float32, as torch converts: this beta2's float32 is the bfloat16 tie 1 - 2^-9, which rounds
    # to even (1.0), where a direct rounding would give 1 - 2^-8.
    dict(lr=1e-3, beta1=0.9, beta2=1.0 - 2.0 ** -9 - 2.0 ** -40, eps=1e-8),
], ids=["fast", "slow-lr", "beta2-tie"])
def test_other_hyperparameters(backend, device, dtype, hyper):
    against_the_oracle(backend, device, [3000, 1], dtype, True, 0.05, steps=3, seed=3, **hyper)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("plus", MODES)
@pytest.mark.gpu_check
def test_many_tensors_and_several_chunks(backend, device, plus):
    """Many rows (several levels of the Triton kernel's binary search), tensors spanning several chunks of every
    kernel, zero-size tensors among them."""
    sizes = [7, 0, 1, 20000, 2048, 2049, 0, 513, 1, 4099, 37, 3]
    against_the_oracle(backend, device, sizes, torch.bfloat16, plus, 0.01, steps=2, seed=3)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_operands_give_the_same_bits(backend, device, dtype):
    """Contiguous views 2 bytes off 16-byte alignment, every operand: the kernels leave their vector path and stay
    exact."""
    sizes = [4099, 20_000]
    state = make_state(sizes, dtype, True, device=device)
    expected, misaligned = clone_state(state), tuple([_misaligned_copy(t) for t in lst] for lst in state)
    expected_metrics, actual_metrics = zero_metrics(device), zero_metrics(device)
    run_steps(ORACLE, expected, sizes, dtype, True, 0.1, steps=2, metrics=expected_metrics, device=device)
    run_steps(kernel(backend), misaligned, sizes, dtype, True, 0.1, steps=2, metrics=actual_metrics, device=device,
              grad_transform=_misaligned_copy)
    assert_same_bits(misaligned, expected)
    assert_metrics_close(actual_metrics, expected_metrics)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_updates_are_compensated(backend, device, dtype):
    """lr = 1e-6 on parameters of a typical initialisation (std 0.02): a plain 16-bit update of that size is lost
    for most elements, the pair keeps nearly all of it (EDQ close to 1), bit for bit as the oracle."""
    sizes = [4097, 1000]
    state = make_state(sizes, dtype, True, seed=7)
    generator = torch.Generator().manual_seed(8)
    for index, size in enumerate(sizes):
        values = 0.02 * torch.randn(size, generator=generator, dtype=torch.float64)
        state[0][index], state[1][index] = values.to(dtype), (values - values.to(dtype).double()).to(dtype)
    actual, metrics = against_the_oracle(backend, device, sizes, dtype, True, 0.1, steps=3, state=state, lr=1e-6)
    edq = (metrics[0] / metrics[1]).item()
    assert edq > 0.9, f"EDQ {edq}"
    theta = torch.cat(actual[0]).cpu()
    plain_lost = ((theta.float() + 1e-6).to(dtype) == theta).double().mean().item()
    assert plain_lost > 0.8, f"a plain {dtype} update of 1e-6 is lost for only {plain_lost:.0%} of the elements"


@pytest.mark.parametrize("backend,device", KERNELS)
def test_empty_lists_and_empty_tensors(backend, device):
    op, metrics = kernel(backend), zero_metrics(device)
    calls = [(True, metrics), (False, metrics)]
    if not ops.COLLAGE.provider(backend).compiled:
        # No tensor at all: only a Python operator can take that call (the dispatcher needs a tensor's device to
        # pick a C++ kernel).
        calls.append((False, None))
    for plus, telemetry in calls:
        op([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, plus, telemetry)
    assert torch.equal(metrics.cpu(), zero_metrics("cpu"))
    # Lists of empty tensors only.
    sizes = [0, (0, 7)]
    for plus in (True, False):
        state = make_state(sizes, torch.bfloat16, plus, device=device)
        run_steps(op, state, sizes, torch.bfloat16, plus, 0.0, steps=1, metrics=metrics, device=device)
    assert torch.equal(metrics.cpu(), zero_metrics("cpu"))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_metrics_are_reproducible_and_strided_views_work(backend, device):
    """The telemetry of several chunks, twice into contiguous tensors and once into a strided view, bit for bit
    the same; the view's other elements untouched."""
    sizes = [20_000, 4097, 1] + SEVERAL_CHUNKS.get(backend, [])
    strided = torch.zeros(8, dtype=torch.float64, device=device)[::2]
    results = []
    for metrics in (zero_metrics(device), zero_metrics(device), strided):
        state = make_state(sizes, torch.bfloat16, True, seed=21, device=device)
        run_steps(kernel(backend), state, sizes, torch.bfloat16, True, 0.01, steps=2, metrics=metrics, device=device)
        results.append(metrics.cpu())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert results[0][3].item() == 2 * sum(sizes)
    assert strided._base[1::2].eq(0).all()


@pytest.mark.parametrize("backend,device", KERNELS)
def test_metrics_accumulate(backend, device):
    """metrics += : a second step adds to what the first left."""
    sizes = [2000]
    state = make_state(sizes, torch.bfloat16, True, device=device)
    grads = make_grads(sizes, torch.bfloat16, torch.Generator().manual_seed(9), device)
    start = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, device=device)
    metrics, fresh = start.clone(), zero_metrics(device)
    kernel(backend)(*step_args(clone_state(state), grads, 1, True, 0.0, fresh))
    kernel(backend)(*step_args(state, grads, 1, True, 0.0, metrics))
    assert torch.equal(metrics, fresh + start)


# ---------------------------------------------------------------------------------------------------------------
# The CPU kernel.

@pytest.mark.parametrize("backend,device", CPU_KERNEL)
def test_thread_count_changes_no_bit(backend, device):
    """Chunks are fixed and their telemetry is summed in chunk order, so 1 and 2 threads agree exactly, metrics
    included (the sizes span many chunks, enough for the kernel to use both threads)."""
    sizes = [100_000, 40_001, 5]
    dtype = torch.bfloat16
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            metrics = zero_metrics(device)
            state = run_steps(kernel(backend), make_state(sizes, dtype, True, seed=7), sizes, dtype, True, 0.01,
                              steps=2, metrics=metrics)
            results.append((state, metrics))
    finally:
        torch.set_num_threads(threads)
    (one_state, one_metrics), (two_state, two_metrics) = results
    assert_same_bits(two_state, one_state)
    assert torch.equal(one_metrics, two_metrics)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernel.

@pytest.mark.parametrize("backend,device", CUDA_KERNEL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plus", MODES)
def test_300_tensors_some_misaligned(backend, device, dtype, plus):
    """Three hundred tensors in one call (the chunk table), sizes from 1 to 40000 (one to three chunks each), every
    seventh with one operand 2 bytes off 16-byte alignment (the element-by-element path, which must give the same
    bits as the vector path): the oracle's bits."""
    generator = torch.Generator().manual_seed(11)
    sizes = [int(n) for n in torch.randint(1, 5000, (300,), generator=generator)]
    for index in (5, 77, 150, 299):
        sizes[index] = int(torch.randint(16_385, 40_000, (1,), generator=generator))
    state = make_state(sizes, dtype, plus, seed=12)
    actual, expected = clone_state(state, device), clone_state(state, device)
    for index in range(0, len(sizes), 7):
        list_index = index % (5 if plus else 4)
        actual[list_index][index] = _misaligned_copy(actual[list_index][index])
    actual_metrics, expected_metrics = zero_metrics(device), zero_metrics(device)
    run_steps(kernel(backend), actual, sizes, dtype, plus, 0.01, steps=2, metrics=actual_metrics, device=device)
    run_steps(ORACLE, expected, sizes, dtype, plus, 0.01, steps=2, metrics=expected_metrics, device=device)
    assert_same_bits(actual, expected)
    assert_metrics_close(actual_metrics, expected_metrics)


@pytest.mark.parametrize("backend,device", CUDA_KERNEL)
def test_second_device(backend, device):
    """Tensors on cuda:1 while cuda:0 is current: the kernel runs on their device (CUDAGuard)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second CUDA device")
    sizes = [30_000, 5]
    state = make_state(sizes, torch.bfloat16, True)
    on_device, on_cpu = clone_state(state, "cuda:1"), clone_state(state)
    metrics, cpu_metrics = zero_metrics("cuda:1"), zero_metrics("cpu")
    with torch.cuda.device(0):
        run_steps(kernel(backend), on_device, sizes, torch.bfloat16, True, 0.01, steps=2, metrics=metrics,
                  device="cuda:1")
    run_steps(ORACLE, on_cpu, sizes, torch.bfloat16, True, 0.01, steps=2, metrics=cpu_metrics)
    assert_same_bits(on_device, on_cpu)
    assert_metrics_close(metrics, cpu_metrics)


@pytest.mark.parametrize("backend,device", CUDA_KERNEL)
def test_side_stream(backend, device):
    sizes = [50_000, 3]
    state = make_state(sizes, torch.float16, True, device=device)
    default_stream, side_stream = clone_state(state), clone_state(state)
    run_steps(kernel(backend), default_stream, sizes, torch.float16, True, 0.0, steps=3, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_steps(kernel(backend), side_stream, sizes, torch.float16, True, 0.0, steps=3, device=device)
    torch.cuda.current_stream().wait_stream(stream)
    assert_same_bits(side_stream, default_stream)


@pytest.mark.parametrize("backend,device", CUDA_KERNEL)
def test_devices_must_match(backend, device):
    op = kernel(backend)
    sizes = [4, 6]
    state = make_state(sizes, torch.bfloat16, True, device=device)
    grads = make_grads(sizes, torch.bfloat16, torch.Generator().manual_seed(3), device)
    with pytest.raises(ValueError, match=r"argument 'grads\[1\]' is on cpu but 'params\[1\]' is on cuda"):
        op(*step_args(state, [grads[0], grads[1].cpu()], 1, True, 0.0, None))
    with pytest.raises(ValueError, match=r"argument 'metrics' is on cpu but 'params\[0\]' is on cuda"):
        op(*step_args(state, grads, 1, True, 0.0, zero_metrics("cpu")))
    # Index 0 wholly on the CPU, index 1 on the GPU: the CUDA kernel is dispatched to, and refuses.
    cpu_first = tuple([lst[0].cpu(), lst[1]] for lst in state)
    with pytest.raises(ValueError, match=r"argument 'params\[1\]' is on cuda:0 but 'params\[0\]' is on cpu"):
        op(*step_args(cpu_first, [grads[0].cpu(), grads[1]], 1, True, 0.0, None))


# ---------------------------------------------------------------------------------------------------------------
# The C++ kernels' argument checks: a TypeError (dtype) or ValueError (anything else) naming the argument, before
# any work.

def _small(device, plus=True, dtype=torch.bfloat16, sizes=(4, 6)):
    state = make_state(list(sizes), dtype, plus, device=device)
    grads = make_grads(list(sizes), dtype, torch.Generator().manual_seed(4), device)
    return state, grads


def _call(backend, state, grads, plus=True, metrics=None):
    kernel(backend)(*step_args(state, grads, 1, plus, 0.0, metrics))


def _replace(state, list_index, item, tensor):
    lists = [list(lst) for lst in state]
    lists[list_index][item] = tensor
    return tuple(lists)


@pytest.mark.parametrize("backend,device", CPP_KERNELS)
@pytest.mark.parametrize("list_index,name", list(enumerate(LISTS))[1:])
def test_list_lengths(backend, device, list_index, name):
    state, grads = _small(device)
    lists = [list(lst) for lst in state]
    lists[list_index] = lists[list_index][:1]
    with pytest.raises(ValueError, match=rf"argument '{name}' has 1 tensors but 'params' has 2"):
        _call(backend, tuple(lists), grads)
    with pytest.raises(ValueError, match=r"argument 'grads' has 1 tensors but 'params' has 2"):
        _call(backend, state, grads[:1])


@pytest.mark.parametrize("backend,device", CPP_KERNELS)
def test_exp_avg_sqs_lo_must_be_empty_in_light_mode(backend, device):
    state, grads = _small(device, plus=True)
    with pytest.raises(ValueError, match=r"argument 'exp_avg_sqs_lo' must be empty when plus is False, got 2"):
        _call(backend, state, grads, plus=False)


@pytest.mark.parametrize("backend,device", CPP_KERNELS)
def test_dtypes(backend, device):
    state, grads = _small(device, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"argument 'params\[0\]' has dtype torch.float32; the kernels support "
                                        r"torch.bfloat16 and torch.float16"):
        _call(backend, state, grads)
    state, grads = _small(device)
    with pytest.raises(TypeError, match=r"argument 'grads\[1\]' has dtype torch.float16 but 'params\[1\]' has dtype "
                                        r"torch.bfloat16"):
        _call(backend, state, [grads[0], grads[1].half()])
    with pytest.raises(TypeError, match=r"argument 'exp_avg_sqs_lo\[0\]' has dtype torch.float32"):
        _call(backend, _replace(state, 4, 0, state[4][0].float()), grads)
    mixed = _replace(state, 0, 1, state[0][1].half())
    with pytest.raises(TypeError, match=r"argument 'params\[1\]' has dtype torch.float16 but 'params\[0\]' has "
                                        r"dtype torch.bfloat16"):
        _call(backend, mixed, grads)


@pytest.mark.parametrize("backend,device", CPP_KERNELS)
def test_shapes_and_contiguity(backend, device):
    state, grads = _small(device)
    with pytest.raises(ValueError, match=r"argument 'exp_avgs\[1\]' has shape \[5\] but 'params\[1\]' has shape "
                                         r"\[6\]"):
        _call(backend, _replace(state, 2, 1, state[2][1][:5]), grads)
    with pytest.raises(ValueError, match=r"argument 'params_lo\[1\]' must be contiguous"):
        _call(backend, _replace(state, 1, 1, torch.zeros(12, dtype=torch.bfloat16, device=device)[::2]), grads)
    with pytest.raises(ValueError, match=r"argument 'params\[1\]' must be contiguous"):
        _call(backend, _replace(state, 0, 1, torch.zeros(12, dtype=torch.bfloat16, device=device)[::2]), grads)


@pytest.mark.parametrize("backend,device", CPP_KERNELS)
def test_shared_memory(backend, device):
    state, grads = _small(device)
    with pytest.raises(ValueError, match=r"arguments 'params\[0\]' and 'params_lo\[0\]' must not share memory"):
        _call(backend, _replace(state, 1, 0, state[0][0]), grads)
    with pytest.raises(ValueError, match=r"arguments 'exp_avg_sqs\[1\]' and 'grads\[1\]' must not share memory"):
        _call(backend, state, [grads[0], state[3][1]])


@pytest.mark.parametrize("backend,device", CPP_KERNELS)
def test_metrics_argument(backend, device):
    state, grads = _small(device)
    with pytest.raises(TypeError, match=r"argument 'metrics' has dtype torch.float32; expected torch.float64"):
        _call(backend, state, grads, metrics=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match=r"argument 'metrics' has shape \[3\]; expected \(4,\)"):
        _call(backend, state, grads, metrics=torch.zeros(3, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"argument 'metrics' has shape \[2, 2\]; expected \(4,\)"):
        _call(backend, state, grads, metrics=torch.zeros(2, 2, dtype=torch.float64, device=device))


@pytest.mark.parametrize("backend,device", CPP_KERNELS)
def test_nothing_changes_when_a_later_tensor_is_bad(backend, device):
    state, grads = _small(device)
    before = clone_state(state)
    metrics = zero_metrics(device)
    with pytest.raises(ValueError):
        _call(backend, _replace(state, 3, 1, state[3][1][:2]), grads, metrics=metrics)
    assert_same_bits(state, before)
    assert torch.equal(metrics.cpu(), zero_metrics("cpu"))


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernel's argument checks.

@pytest.mark.parametrize("backend,device", TRITON_KERNEL)
def test_triton_rejects_bad_inputs(backend, device):
    state, grads = _small(device, plus=False, sizes=(8,))
    arguments = (1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, False, None)
    strided = torch.zeros(16, dtype=torch.bfloat16, device=device)[::2]
    with pytest.raises(AssertionError, match="contiguous"):
        kernel(backend)(*state, [strided], *arguments)
    with pytest.raises(ValueError, match="float16"):
        kernel(backend)(*([t.float() for t in lst] for lst in state), [grads[0].float()], *arguments)
    with pytest.raises(ValueError, match="grads"):
        kernel(backend)(*state, [grads[0].half()], *arguments)
