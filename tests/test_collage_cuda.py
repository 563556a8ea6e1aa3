"""The CUDA kernel of Collage AdamW's fused multi-tensor step (csrc/cuda/collage.cu), called through
torch.ops.leanops.collage_adamw_step_ on CUDA tensors: the same bits as the oracle
(torch.ops.leanops_reference.collage_adamw_step_, python/leanops/reference/collage.py) and as the CPU kernel, step
after step; the telemetry within summation tolerance (relative 1e-5, counts exact) and bitwise reproducible from run
to run.

Also: many tensors in one call (the chunk table), operands that are not 16-byte aligned (the element-by-element
path, which must give the same bits as the vector path), a side stream, and the checks that need a second device.
"""
import pytest
import torch

import leanops  # noqa: F401  (loads leanops._C, which registers the ops)
from test_collage_cpu import (AWKWARD_SIZES, DTYPES, assert_metrics_close, assert_same_bits, clone_state,
                              kernel_registered, make_grads, make_state, run_steps, step_args)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not kernel_registered("CUDA"),
                       reason="leanops._C has no CUDA kernel of leanops::collage_adamw_step_ (stale or CPU-only "
                              "build?)"),
]

CUDA = "cuda"


def _to(state, device):
    return tuple([t.to(device, copy=True) for t in lst] for lst in state)


def _metrics(device=CUDA):
    return torch.zeros(4, dtype=torch.float64, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("plus", [False, True], ids=["light", "plus"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd0.1"])
def test_five_steps_match_the_reference_and_the_cpu_kernel(dtype, plus, weight_decay):
    state = make_state(AWKWARD_SIZES + [70_000], dtype, plus)  # 70000: five chunks of the CUDA kernel's 16384
    sizes = AWKWARD_SIZES + [70_000]
    reference_state, cuda_state, cpu_state = _to(state, CUDA), _to(state, CUDA), clone_state(state)
    reference_metrics, cuda_metrics, cpu_metrics = _metrics(), _metrics(), _metrics("cpu")
    run_steps(torch.ops.leanops_reference.collage_adamw_step_, reference_state, sizes, dtype, plus, weight_decay,
              steps=5, metrics=reference_metrics, device=CUDA)
    run_steps(torch.ops.leanops.collage_adamw_step_, cuda_state, sizes, dtype, plus, weight_decay, steps=5,
              metrics=cuda_metrics, device=CUDA)
    run_steps(torch.ops.leanops.collage_adamw_step_, cpu_state, sizes, dtype, plus, weight_decay, steps=5,
              metrics=cpu_metrics)
    assert_same_bits(cuda_state, reference_state)
    assert_same_bits(cuda_state, cpu_state)
    assert_metrics_close(cuda_metrics, reference_metrics)
    assert_metrics_close(cuda_metrics, cpu_metrics)
    assert not torch.equal(cuda_state[0][2].cpu(), state[0][2])


def _misaligned_copy(t):
    """A contiguous copy of t whose data starts 2 bytes past a 16-byte boundary."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("plus", [False, True], ids=["light", "plus"])
def test_300_tensors_some_misaligned(dtype, plus):
    """Three hundred tensors in one call, sizes from 1 to 40000 (one to three chunks each), every seventh with one
    operand 2 bytes off 16-byte alignment (the element-by-element path): the same bits as the CPU kernel and the
    reference."""
    generator = torch.Generator().manual_seed(11)
    sizes = [int(n) for n in torch.randint(1, 5000, (300,), generator=generator)]
    for index in (5, 77, 150, 299):
        sizes[index] = int(torch.randint(16_385, 40_000, (1,), generator=generator))
    state = make_state(sizes, dtype, plus, seed=12)
    cuda_state = _to(state, CUDA)
    for index in range(0, len(sizes), 7):
        list_index = index % (5 if plus else 4)
        cuda_state[list_index][index] = _misaligned_copy(cuda_state[list_index][index])
    reference_state, cpu_state = _to(state, CUDA), clone_state(state)
    cuda_metrics, cpu_metrics, reference_metrics = _metrics(), _metrics("cpu"), _metrics()
    run_steps(torch.ops.leanops.collage_adamw_step_, cuda_state, sizes, dtype, plus, 0.01, steps=2,
              metrics=cuda_metrics, device=CUDA)
    run_steps(torch.ops.leanops.collage_adamw_step_, cpu_state, sizes, dtype, plus, 0.01, steps=2,
              metrics=cpu_metrics)
    run_steps(torch.ops.leanops_reference.collage_adamw_step_, reference_state, sizes, dtype, plus, 0.01, steps=2,
              metrics=reference_metrics, device=CUDA)
    assert_same_bits(cuda_state, cpu_state)
    assert_same_bits(cuda_state, reference_state)
    assert_metrics_close(cuda_metrics, cpu_metrics)
    assert_metrics_close(cuda_metrics, reference_metrics)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_misaligned_operands_give_the_same_bits(dtype):
    sizes = [4099, 20_000]
    state = make_state(sizes, dtype, True, device=CUDA)
    aligned = clone_state(state)
    misaligned = tuple([_misaligned_copy(t) for t in lst] for lst in state)
    run_steps(torch.ops.leanops.collage_adamw_step_, aligned, sizes, dtype, True, 0.1, steps=2, device=CUDA)
    run_steps(torch.ops.leanops.collage_adamw_step_, misaligned, sizes, dtype, True, 0.1, steps=2, device=CUDA,
              grad_transform=_misaligned_copy)
    assert_same_bits(misaligned, aligned)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernel runs on their device (CUDAGuard)."""
    sizes = [30_000, 5]
    state = make_state(sizes, torch.bfloat16, True)
    on_device, on_cpu = _to(state, "cuda:1"), clone_state(state)
    metrics, cpu_metrics = _metrics("cuda:1"), _metrics("cpu")
    with torch.cuda.device(0):
        run_steps(torch.ops.leanops.collage_adamw_step_, on_device, sizes, torch.bfloat16, True, 0.01, steps=2,
                  metrics=metrics, device="cuda:1")
    run_steps(torch.ops.leanops.collage_adamw_step_, on_cpu, sizes, torch.bfloat16, True, 0.01, steps=2,
              metrics=cpu_metrics)
    assert_same_bits(on_device, on_cpu)
    assert_metrics_close(metrics, cpu_metrics)


def test_metrics_are_reproducible_and_strided_views_work():
    sizes = [300_000, 4097, 1]
    results = []
    for metrics in (_metrics(), _metrics(), torch.zeros(8, dtype=torch.float64, device=CUDA)[::2]):
        state = make_state(sizes, torch.bfloat16, True, seed=21, device=CUDA)
        run_steps(torch.ops.leanops.collage_adamw_step_, state, sizes, torch.bfloat16, True, 0.01, steps=2,
                  metrics=metrics, device=CUDA)
        results.append(metrics.cpu())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert results[0][3].item() == 2 * sum(sizes)


def test_side_stream():
    sizes = [50_000, 3]
    state = make_state(sizes, torch.float16, True, device=CUDA)
    default_stream, side_stream = clone_state(state), clone_state(state)
    run_steps(torch.ops.leanops.collage_adamw_step_, default_stream, sizes, torch.float16, True, 0.0, steps=3,
              device=CUDA)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_steps(torch.ops.leanops.collage_adamw_step_, side_stream, sizes, torch.float16, True, 0.0, steps=3,
                  device=CUDA)
    torch.cuda.current_stream().wait_stream(stream)
    assert_same_bits(side_stream, default_stream)


def test_empty_lists_and_empty_tensors():
    metrics = _metrics()
    torch.ops.leanops.collage_adamw_step_([], [], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001, True,
                                          metrics)
    sizes = [0, (0, 3)]
    state = make_state(sizes, torch.bfloat16, True, device=CUDA)
    run_steps(torch.ops.leanops.collage_adamw_step_, state, sizes, torch.bfloat16, True, 0.0, steps=1,
              metrics=metrics, device=CUDA)
    assert torch.equal(metrics.cpu(), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("plus", [False, True], ids=["light", "plus"])
def test_opcheck(plus):
    sizes = [37, (3, 5)]
    state = make_state(sizes, torch.float16, plus, device=CUDA)
    grads = make_grads(sizes, torch.float16, torch.Generator().manual_seed(2), CUDA)
    torch.library.opcheck(torch.ops.leanops.collage_adamw_step_.default,
                          step_args(state, grads, 1, plus, 0.01, _metrics()))


def test_devices_must_match():
    sizes = [4, 6]
    state = make_state(sizes, torch.bfloat16, True, device=CUDA)
    grads = make_grads(sizes, torch.bfloat16, torch.Generator().manual_seed(3), CUDA)
    with pytest.raises(ValueError, match=r"argument 'grads\[1\]' is on cpu but 'params\[1\]' is on cuda"):
        torch.ops.leanops.collage_adamw_step_(*step_args(state, [grads[0], grads[1].cpu()], 1, True, 0.0, None))
    with pytest.raises(ValueError, match=r"argument 'metrics' is on cpu but 'params\[0\]' is on cuda"):
        torch.ops.leanops.collage_adamw_step_(*step_args(state, grads, 1, True, 0.0, _metrics("cpu")))
    # Index 0 wholly on the CPU, index 1 on the GPU: the CUDA kernel is dispatched to, and refuses.
    cpu_first = tuple([lst[0].cpu(), lst[1]] for lst in state)
    with pytest.raises(ValueError, match=r"argument 'params\[1\]' is on cuda:0 but 'params\[0\]' is on cpu"):
        torch.ops.leanops.collage_adamw_step_(*step_args(cpu_first, [grads[0].cpu(), grads[1]], 1, True, 0.0,
                                                         None))
