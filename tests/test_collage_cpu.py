"""The C++ CPU kernel of Collage AdamW's fused multi-tensor step (csrc/cpu/collage.cpp), called through
torch.ops.leanops.collage_adamw_step_, against the oracle torch.ops.leanops_reference.collage_adamw_step_
(python/leanops/reference/collage.py): the same bits for every state tensor, step after step, and the telemetry
within summation tolerance (relative 1e-5; the counts exactly).

Inputs: lists with awkward sizes (1, 3, 1000, 4097, a 2-D tensor, an empty tensor, one of several chunks), 5 steps in
a row with fresh random gradients, bfloat16 and float16, light and plus, with and without weight decay; float16 low
parts and moments reach into the subnormals. The square root is where a backend would most easily depart from the
contract: the kernels take an IEEE sqrt, and so does the reference (reference.collage.sqrt_rn; torch's own float32
CPU sqrt is not always correctly rounded), so float16's rounding ties of delta come out the same.

Helpers here (make_state, clone_state, run_steps, ...) are shared with tests/test_collage_cuda.py.
"""
import pytest
import torch

import leanops  # noqa: F401  (loads leanops._C, which registers the ops)
import leanops.custom_ops  # noqa: F401  (registers leanops_reference::collage_adamw_step_)

OP_NAME = "collage_adamw_step_"


def kernel_registered(dispatch_key: str) -> bool:
    """Whether this build of leanops._C has the op with a kernel for `dispatch_key` (a stale build may lack it)."""
    return hasattr(torch.ops.leanops, OP_NAME) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"leanops::{OP_NAME}", dispatch_key)


pytestmark = pytest.mark.skipif(not kernel_registered("CPU"),
                                reason="leanops._C has no CPU kernel of leanops::collage_adamw_step_ (stale build?)")

DTYPES = [torch.bfloat16, torch.float16]
AWKWARD_SIZES = [1, 3, 1000, 4097, (37, 53), 0, 20000]  # 20000: two chunks of the CPU kernel's 16384
LISTS = ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "exp_avg_sqs_lo")


# ---------------------------------------------------------------------------------------------------------------
# Inputs.

def _spread(shape, generator, low_exponent, high_exponent):
    """float32 values with random signs and log-uniform magnitudes in [10^low, 10^high)."""
    exponent = torch.empty(shape).uniform_(low_exponent, high_exponent, generator=generator)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return sign * 10.0 ** exponent


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
        shape = size if isinstance(size, tuple) else (size,)
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
    grads = []
    for size in sizes:
        shape = size if isinstance(size, tuple) else (size,)
        grads.append(_spread(shape, generator, low, 0).to(dtype).to(device))
    return grads


def clone_state(state):
    return tuple([t.clone() for t in lst] for lst in state)


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


# ---------------------------------------------------------------------------------------------------------------
# Parity.

@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("plus", [False, True], ids=["light", "plus"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd0.1"])
def test_five_steps_match_the_reference_bit_for_bit(dtype, plus, weight_decay):
    state = make_state(AWKWARD_SIZES, dtype, plus)
    expected, actual = clone_state(state), clone_state(state)
    expected_metrics = torch.zeros(4, dtype=torch.float64)
    actual_metrics = torch.zeros(4, dtype=torch.float64)
    run_steps(torch.ops.leanops_reference.collage_adamw_step_, expected, AWKWARD_SIZES, dtype, plus, weight_decay,
              steps=5, metrics=expected_metrics)
    run_steps(torch.ops.leanops.collage_adamw_step_, actual, AWKWARD_SIZES, dtype, plus, weight_decay, steps=5,
              metrics=actual_metrics)
    assert_same_bits(actual, expected)
    assert_metrics_close(actual_metrics, expected_metrics)
    assert actual_metrics[3].item() == 5 * sum(t.numel() for t in state[0])
    # The state moved: a step that did nothing would match a broken oracle too.
    assert not torch.equal(actual[0][2], state[0][2]) and not torch.equal(actual[2][2], state[2][2])


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("plus", [False, True], ids=["light", "plus"])
def test_without_metrics_the_state_is_the_same(dtype, plus):
    sizes = [5000, 17]
    with_metrics = run_steps(torch.ops.leanops.collage_adamw_step_, make_state(sizes, dtype, plus), sizes, dtype,
                             plus, 0.01, steps=2, metrics=torch.zeros(4, dtype=torch.float64))
    without = run_steps(torch.ops.leanops.collage_adamw_step_, make_state(sizes, dtype, plus), sizes, dtype, plus,
                        0.01, steps=2, metrics=None)
    assert_same_bits(without, with_metrics)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("hyper", [
    dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6),
    dict(lr=3e-5, beta1=0.0, beta2=0.9999, eps=1e-12),
    # float64 -> F through float32, as torch converts: this beta2's float32 is the bfloat16 tie 1 - 2^-9, which rounds
    # to even (1.0), where a direct rounding would give 1 - 2^-8.
    dict(lr=1e-3, beta1=0.9, beta2=1.0 - 2.0 ** -9 - 2.0 ** -40, eps=1e-8),
], ids=["fast", "slow", "beta2-tie"])
def test_other_hyperparameters(dtype, hyper):
    sizes = [3000, 1]
    plus = True
    state = make_state(sizes, dtype, plus, seed=3)
    expected, actual = clone_state(state), clone_state(state)
    run_steps(torch.ops.leanops_reference.collage_adamw_step_, expected, sizes, dtype, plus, 0.05, steps=3, **hyper)
    run_steps(torch.ops.leanops.collage_adamw_step_, actual, sizes, dtype, plus, 0.05, steps=3, **hyper)
    assert_same_bits(actual, expected)


def test_empty_lists_and_empty_tensors():
    metrics = torch.zeros(4, dtype=torch.float64)
    torch.ops.leanops.collage_adamw_step_([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, True,
                                          metrics)
    torch.ops.leanops.collage_adamw_step_([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, False,
                                          metrics)
    assert torch.equal(metrics, torch.zeros(4, dtype=torch.float64))
    # Lists of empty tensors only.
    sizes = [0, (0, 7)]
    state = make_state(sizes, torch.bfloat16, True)
    run_steps(torch.ops.leanops.collage_adamw_step_, state, sizes, torch.bfloat16, True, 0.0, steps=1,
              metrics=metrics)
    assert torch.equal(metrics, torch.zeros(4, dtype=torch.float64))


def test_thread_count_changes_no_bit():
    """Chunks are fixed and their telemetry is summed in chunk order, so 1 and 2 threads agree exactly, metrics
    included (the sizes span many chunks, enough for the kernel to use both threads)."""
    sizes = [100_000, 40_001, 5]
    dtype = torch.bfloat16
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            metrics = torch.zeros(4, dtype=torch.float64)
            state = run_steps(torch.ops.leanops.collage_adamw_step_, make_state(sizes, dtype, True, seed=7), sizes,
                              dtype, True, 0.01, steps=2, metrics=metrics)
            results.append((state, metrics))
    finally:
        torch.set_num_threads(threads)
    (one_state, one_metrics), (two_state, two_metrics) = results
    assert_same_bits(two_state, one_state)
    assert torch.equal(one_metrics, two_metrics)


def test_strided_metrics_view():
    sizes = [1000, 3]
    contiguous = torch.zeros(4, dtype=torch.float64)
    strided = torch.zeros(8, dtype=torch.float64)[::2]
    for metrics in (contiguous, strided):
        run_steps(torch.ops.leanops.collage_adamw_step_, make_state(sizes, torch.float16, False), sizes,
                  torch.float16, False, 0.0, steps=1, metrics=metrics)
    assert torch.equal(contiguous, strided)
    assert strided._base[1::2].eq(0).all()


def test_metrics_accumulate():
    """metrics += : a second step adds to what the first left."""
    sizes = [2000]
    state = make_state(sizes, torch.bfloat16, True)
    generator = torch.Generator().manual_seed(9)
    grads = make_grads(sizes, torch.bfloat16, generator)
    metrics = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    fresh = torch.zeros(4, dtype=torch.float64)
    torch.ops.leanops.collage_adamw_step_(*step_args(clone_state(state), grads, 1, True, 0.0, fresh))
    torch.ops.leanops.collage_adamw_step_(*step_args(state, grads, 1, True, 0.0, metrics))
    assert torch.equal(metrics, fresh + torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("plus", [False, True], ids=["light", "plus"])
@pytest.mark.parametrize("with_metrics", [False, True], ids=["no-metrics", "metrics"])
def test_opcheck(plus, with_metrics):
    sizes = [37, (3, 5)]
    state = make_state(sizes, torch.bfloat16, plus)
    grads = make_grads(sizes, torch.bfloat16, torch.Generator().manual_seed(2))
    metrics = torch.zeros(4, dtype=torch.float64) if with_metrics else None
    torch.library.opcheck(torch.ops.leanops.collage_adamw_step_.default, step_args(state, grads, 1, plus, 0.01,
                                                                                    metrics))


# ---------------------------------------------------------------------------------------------------------------
# Validation: a TypeError (dtype) or ValueError (anything else) naming the argument, before any work.

def _small(plus=True, dtype=torch.bfloat16, sizes=(4, 6)):
    state = make_state(list(sizes), dtype, plus)
    grads = make_grads(list(sizes), dtype, torch.Generator().manual_seed(4))
    return state, grads


def _call(state, grads, plus=True, metrics=None):
    torch.ops.leanops.collage_adamw_step_(*step_args(state, grads, 1, plus, 0.0, metrics))


def _replace(state, list_index, item, tensor):
    lists = [list(lst) for lst in state]
    lists[list_index][item] = tensor
    return tuple(lists)


@pytest.mark.parametrize("list_index,name", list(enumerate(LISTS))[1:])
def test_list_lengths(list_index, name):
    state, grads = _small()
    lists = [list(lst) for lst in state]
    lists[list_index] = lists[list_index][:1]
    with pytest.raises(ValueError, match=rf"argument '{name}' has 1 tensors but 'params' has 2"):
        _call(tuple(lists), grads)
    with pytest.raises(ValueError, match=r"argument 'grads' has 1 tensors but 'params' has 2"):
        _call(state, grads[:1])


def test_exp_avg_sqs_lo_must_be_empty_in_light_mode():
    state, grads = _small(plus=True)
    with pytest.raises(ValueError, match=r"argument 'exp_avg_sqs_lo' must be empty when plus is False, got 2"):
        _call(state, grads, plus=False)


def test_dtypes():
    state, grads = _small(dtype=torch.float32)
    with pytest.raises(TypeError, match=r"argument 'params\[0\]' has dtype torch.float32; the kernels support "
                                        r"torch.bfloat16 and torch.float16"):
        _call(state, grads)
    state, grads = _small()
    with pytest.raises(TypeError, match=r"argument 'grads\[1\]' has dtype torch.float16 but 'params\[1\]' has dtype "
                                        r"torch.bfloat16"):
        _call(state, [grads[0], grads[1].half()])
    with pytest.raises(TypeError, match=r"argument 'exp_avg_sqs_lo\[0\]' has dtype torch.float32"):
        _call(_replace(state, 4, 0, state[4][0].float()), grads)
    mixed = _replace(state, 0, 1, state[0][1].half())
    with pytest.raises(TypeError, match=r"argument 'params\[1\]' has dtype torch.float16 but 'params\[0\]' has "
                                        r"dtype torch.bfloat16"):
        _call(mixed, grads)


def test_shapes_and_contiguity():
    state, grads = _small()
    with pytest.raises(ValueError, match=r"argument 'exp_avgs\[1\]' has shape \[5\] but 'params\[1\]' has shape "
                                         r"\[6\]"):
        _call(_replace(state, 2, 1, state[2][1][:5]), grads)
    strided = torch.zeros(12, dtype=torch.bfloat16)[::2]
    with pytest.raises(ValueError, match=r"argument 'params_lo\[1\]' must be contiguous"):
        _call(_replace(state, 1, 1, strided), grads)
    with pytest.raises(ValueError, match=r"argument 'params\[1\]' must be contiguous"):
        _call(_replace(state, 0, 1, torch.zeros(12, dtype=torch.bfloat16)[::2]), grads)


def test_shared_memory():
    state, grads = _small()
    with pytest.raises(ValueError, match=r"arguments 'params\[0\]' and 'params_lo\[0\]' must not share memory"):
        _call(_replace(state, 1, 0, state[0][0]), grads)
    with pytest.raises(ValueError, match=r"arguments 'exp_avg_sqs\[1\]' and 'grads\[1\]' must not share memory"):
        _call(state, [grads[0], state[3][1]])


def test_metrics_argument():
    state, grads = _small()
    with pytest.raises(TypeError, match=r"argument 'metrics' has dtype torch.float32; expected torch.float64"):
        _call(state, grads, metrics=torch.zeros(4))
    with pytest.raises(ValueError, match=r"argument 'metrics' has shape \[3\]; expected \(4,\)"):
        _call(state, grads, metrics=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"argument 'metrics' has shape \[2, 2\]; expected \(4,\)"):
        _call(state, grads, metrics=torch.zeros(2, 2, dtype=torch.float64))


def test_nothing_changes_when_a_later_tensor_is_bad():
    state, grads = _small()
    before = clone_state(state)
    metrics = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError):
        _call(_replace(state, 3, 1, state[3][1][:2]), grads, metrics=metrics)
    assert_same_bits(state, before)
    assert torch.equal(metrics, torch.zeros(4, dtype=torch.float64))
