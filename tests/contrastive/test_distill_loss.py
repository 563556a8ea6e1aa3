"""leanops.distill: open_clip's distillation term (DistillClipLoss.dist_loss, both directions) on row blocks, equal
to the dense formula in value and in the gradients of every input (student features and scale, and the teacher's
when they require one), in float64 at awkward sizes (B = 1, 7, blocks that do not divide B, a teacher of another
width) and in float32 / bfloat16; bad arguments are refused by name; and the memory the forward and backward
allocate (every tensor counted while alive) grows with the block, far below one B x B matrix."""
import weakref

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import leanops.distill as distill


def _dense_distillation(image, text, scale, teacher_image, teacher_text, teacher_scale):
    """open_clip's DistillClipLoss distillation term, verbatim (loss.py: dist_loss over both directions)."""
    def dist_loss(teacher_logits, student_logits):
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    logits_per_image = scale * image @ text.T
    teacher_logits_per_image = teacher_scale * teacher_image @ teacher_text.T
    return (dist_loss(teacher_logits_per_image, logits_per_image)
            + dist_loss(teacher_logits_per_image.T, logits_per_image.T)) / 2


def _inputs(batch, width, teacher_width, dtype, seed=0, teacher_grad=True):
    generator = torch.Generator().manual_seed(seed)

    def features(rows, columns, grad):
        values = torch.nn.functional.normalize(torch.randn(rows, columns, generator=generator, dtype=torch.float64),
                                               dim=1)
        return values.to(dtype).requires_grad_(grad)

    image, text = features(batch, width, True), features(batch, width, True)
    teacher_image = features(batch, teacher_width, teacher_grad)
    teacher_text = features(batch, teacher_width, teacher_grad)
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    teacher_scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=teacher_grad)
    return image, text, scale, teacher_image, teacher_text, teacher_scale


@pytest.mark.parametrize("batch,block_size", [(1, None), (7, None), (7, 3), (7, 1), (33, 8)])
@pytest.mark.parametrize("teacher_grad", [True, False])
def test_float64_equals_open_clips_formula_with_every_gradient(batch, block_size, teacher_grad):
    inputs = _inputs(batch, 5, 3, torch.float64, seed=batch, teacher_grad=teacher_grad)
    leaves = [t for t in inputs if t.requires_grad]
    expected = _dense_distillation(*inputs)
    expected_grads = torch.autograd.grad(expected, leaves)
    loss = distill.distillation_loss(*inputs, block_size=block_size)
    grads = torch.autograd.grad(loss, leaves)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-13)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_rectangular_rows_weighted_equal_the_dense_rows():
    """distillation_rows on n x m (open_clip's local loss: this rank's rows against every rank's columns), with an
    arbitrary weighting of the rows in the backward."""
    generator = torch.Generator().manual_seed(3)
    query, keys = torch.randn(4, 6, generator=generator, dtype=torch.float64), torch.randn(9, 6, generator=generator,
                                                                                            dtype=torch.float64)
    teacher_query = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    teacher_keys = torch.randn(9, 2, generator=generator, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (query, keys, teacher_query, teacher_keys)]
    weights = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    student, teacher = 3.0 * query @ keys.T, 2.0 * teacher_query @ teacher_keys.T
    expected = -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum(dim=1)
    rows = distill.distillation_rows(query, keys, 3.0, teacher_query, teacher_keys, 2.0, block_size=3)
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-13)
    for grad, expected_grad in zip(torch.autograd.grad((rows * weights).sum(), leaves),
                                   torch.autograd.grad((expected * weights).sum(), leaves)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_lower_precision_features_accumulate_in_float32(dtype, tolerance):
    """16-bit inputs are exact in float64: the float32 accumulation must be within float32 accuracy of it."""
    inputs = _inputs(45, 16, 8, dtype, seed=1)
    upcast = [t.detach().double().requires_grad_() for t in inputs]
    expected = _dense_distillation(*upcast)
    expected_grads = torch.autograd.grad(expected, upcast)
    loss = distill.distillation_loss(*inputs, block_size=10)
    grads = torch.autograd.grad(loss, inputs)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= tolerance * abs(expected.item())
    for grad, expected_grad, leaf in zip(grads, expected_grads, inputs):
        assert grad.dtype == leaf.dtype
        size = expected_grad.abs().max().item()
        # bfloat16 gradients are rounded once to bfloat16.
        allowed = max(tolerance, 2 * torch.finfo(leaf.dtype).eps) * size
        assert (grad.double() - expected_grad).abs().max().item() <= allowed


def test_bad_arguments_are_refused_by_name():
    image, text, scale, teacher_image, teacher_text, teacher_scale = _inputs(6, 4, 3, torch.float64)
    with pytest.raises(ValueError, match="'teacher_query' has 5 rows"):
        distill.distillation_loss(image, text, scale, teacher_image[:5], teacher_text, teacher_scale)
    with pytest.raises(ValueError, match="'keys'.*same feature width"):
        distill.distillation_loss(image, text[:, :3], scale, teacher_image, teacher_text, teacher_scale)
    with pytest.raises(TypeError, match="'teacher_keys' has dtype torch.float32"):
        distill.distillation_loss(image, text, scale, teacher_image, teacher_text.float(), teacher_scale)
    with pytest.raises(ValueError, match="'teacher_logit_scale' must be finite and positive"):
        distill.distillation_loss(image, text, scale, teacher_image, teacher_text, -1.0)
    with pytest.raises(ValueError, match="'block_size'"):
        distill.distillation_loss(image, text, scale, teacher_image, teacher_text, teacher_scale, block_size=0)
    with pytest.raises(ValueError, match="empty"):
        distill.distillation_loss(image[:0], text[:0], scale, teacher_image[:0], teacher_text[:0], teacher_scale)


class _LiveMemory(TorchDispatchMode):
    """A tracking allocator in Python: the bytes of the storages that the operators run inside the mode create,
    while some tensor still refers to them, and their peak (views and in-place results count once)."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage address -> [bytes, tensors referring to it]
        self.current = self.peak = self.largest = 0

    def _release(self, address):
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
            if address not in self.live:
                self.live[address] = [size, 0]
                self.current += size
                self.peak = max(self.peak, self.current)
                self.largest = max(self.largest, size)
            self.live[address][1] += 1
            weakref.finalize(tensor, self._release, address)
        return out


def test_memory_grows_with_the_block_not_with_the_batch_squared():
    """Every tensor the forward and backward create is counted while alive: the largest is one block x B float32
    matrix, and the peak of all of them together is a few such matrices plus O(B D), far below one B x B matrix
    (the dense formula, measured the same way, keeps several)."""
    batch, width, block = 1024, 8, 16
    image, text, scale, teacher_image, teacher_text, teacher_scale = _inputs(batch, width, 6, torch.float32,
                                                                             teacher_grad=False)
    with _LiveMemory() as memory:
        loss = distill.distillation_loss(image, text, scale, teacher_image, teacher_text, teacher_scale,
                                         block_size=block)
        loss.backward()
    matrix, block_matrix = batch * batch * 4, block * batch * 4
    assert memory.largest <= block_matrix
    assert memory.peak <= 8 * block_matrix + 16 * batch * width * 4, (memory.peak, block_matrix)
    assert memory.peak < matrix / 4, f"peak {memory.peak / 2**20:.1f} MiB vs one B x B matrix {matrix / 2**20} MiB"
    with _LiveMemory() as dense:
        _dense_distillation(image, text, scale, teacher_image, teacher_text, teacher_scale).backward()
    assert dense.peak >= 2 * matrix  # the tracker sees what the dense formula allocates
