"""Distillation toward a teacher's similarity distribution (open_clip's ``DistillClipLoss``) without the B x B logits.

open_clip's distillation term, with student logits S = s X Y^T and teacher logits T = t U V^T (each row of U, V is
the teacher's embedding of the same image / text; the teacher's width may differ from the student's):

    dist(T, S) = -mean_i sum_j softmax(T)_ij log_softmax(S)_ij = mean_i [lse_j S_ij - sum_j P_ij S_ij],  P = softmax(T)
    distill    = 1/2 (dist(T, S) + dist(T^T, S^T))             (image->text rows, then text->image rows)

Every row's term needs only that row of S and T, so the loss is computed on row blocks: ``distillation_rows``
walks the (n, m) matrices ``block`` rows at a time, forward and backward (which recomputes the blocks from the
saved O(n) statistics), so memory is O((n + m) D + block m), never n x m. The text->image direction is the same
function with the roles of images and texts swapped (S^T = s Y X^T): twice the matrix products of a fused
row-and-column pass, in exchange for a primitive that also serves open_clip's local loss (this rank's rows
against every rank's columns).

Gradients, with g_i the weight of row i: dS_ij = g_i (softmax(S)_ij - P_ij); dT_ij = -g_i P_ij (S_ij - r_i),
r_i = sum_j P_ij S_ij; then d(query) = s dS K, d(keys) = s dS^T Q, ds = sum dS * QK^T (and the same for the teacher,
whose inputs get gradients when they require them, as with open_clip's formula; open_clip_train computes the
teacher under torch.no_grad, so they do not).

This first version is plain PyTorch (torch matrix products on row blocks, like ``leanops.reference``), on any device
and dtype; statistics and products in float32 (float64 for float64 inputs). Reference: open_clip ``loss.py``
(``DistillClipLoss.dist_loss``); the distillation itself is Hinton et al. 2015.
"""
import torch

from . import _validation, contrastive
from .ops.registry import refuse_second_derivative

Tensor = torch.Tensor

# Elements of one (block, m) float32 matrix (4 MiB): about seven such matrices live at once in the backward.
BLOCK_ELEMENTS = 1 << 20


def _block_rows(rows: int, columns: int, block_size: int | None) -> int:
    if block_size is not None:
        return max(1, min(rows, block_size))
    return max(1, min(rows, BLOCK_ELEMENTS // max(columns, 1)))


class _DistillationRows(torch.autograd.Function):
    """(query (n, D), keys (m, D), scale, teacher query (n, Dt), teacher keys (m, Dt), teacher scale, block) ->
    per-row loss (n,): lse_j S_ij - sum_j softmax(T)_ij S_ij."""

    @staticmethod
    def forward(ctx, query, keys, scale, teacher_query, teacher_keys, teacher_scale, block):
        dtype = scale.dtype
        keys32, teacher_keys32 = keys.to(dtype), teacher_keys.to(dtype)
        rows = query.shape[0]
        student_lse = torch.empty(rows, dtype=dtype, device=query.device)
        teacher_lse = torch.empty_like(student_lse)
        expected = torch.empty_like(student_lse)
        for start in range(0, rows, block):
            part = slice(start, start + block)
            student = scale * (query[part].to(dtype) @ keys32.T)
            teacher = teacher_scale * (teacher_query[part].to(dtype) @ teacher_keys32.T)
            student_lse[part] = torch.logsumexp(student, dim=1)
            teacher_lse[part] = torch.logsumexp(teacher, dim=1)
            expected[part] = (torch.exp(teacher - teacher_lse[part, None]) * student).sum(dim=1)
            del student, teacher
        ctx.save_for_backward(query, keys, scale, teacher_query, teacher_keys, teacher_scale, student_lse,
                              teacher_lse, expected)
        ctx.block = block
        return student_lse - expected

    @staticmethod
    def backward(ctx, grad_rows):
        refuse_second_derivative("leanops.distill (the distillation loss)")
        (query, keys, scale, teacher_query, teacher_keys, teacher_scale, student_lse, teacher_lse,
         expected) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        teacher_grads = any(needs[3:6])
        dtype = scale.dtype
        block = ctx.block
        grad_rows = grad_rows.to(dtype)
        keys32, teacher_keys32 = keys.to(dtype), teacher_keys.to(dtype)
        grad_query = torch.zeros(query.shape, dtype=dtype, device=query.device)
        grad_keys = torch.zeros(keys.shape, dtype=dtype, device=keys.device)
        grad_scale = torch.zeros((), dtype=dtype, device=query.device)
        if teacher_grads:
            grad_teacher_query = torch.zeros(teacher_query.shape, dtype=dtype, device=query.device)
            grad_teacher_keys = torch.zeros(teacher_keys.shape, dtype=dtype, device=keys.device)
            grad_teacher_scale = torch.zeros((), dtype=dtype, device=query.device)
        for start in range(0, query.shape[0], block):
            part = slice(start, start + block)
            query32 = query[part].to(dtype)
            teacher_query32 = teacher_query[part].to(dtype)
            similarity = query32 @ keys32.T
            teacher_similarity = teacher_query32 @ teacher_keys32.T
            student = scale * similarity
            teacher_probability = torch.exp(teacher_scale * teacher_similarity - teacher_lse[part, None])
            weight = grad_rows[part, None]
            if teacher_grads:
                # dT = -g P (S - r), before `student` is overwritten below.
                grad_teacher = (student - expected[part, None]).mul_(teacher_probability).mul_(-weight)
                grad_teacher_scale += (grad_teacher * teacher_similarity).sum()
                grad_teacher.mul_(teacher_scale)
                grad_teacher_query[part] = grad_teacher @ teacher_keys32
                grad_teacher_keys.addmm_(grad_teacher.T, teacher_query32)
                del grad_teacher
            del teacher_similarity
            # dS = g (softmax(S) - P), in place on the block.
            grad_student = torch.exp_(student.sub_(student_lse[part, None])).sub_(teacher_probability).mul_(weight)
            del teacher_probability
            grad_scale += (grad_student * similarity).sum()
            del similarity
            grad_student.mul_(scale)
            grad_query[part] = grad_student @ keys32
            grad_keys.addmm_(grad_student.T, query32)
            del grad_student
        grads = [grad_query.to(query.dtype), grad_keys.to(keys.dtype), grad_scale]
        if teacher_grads:
            grads += [grad_teacher_query.to(teacher_query.dtype), grad_teacher_keys.to(teacher_keys.dtype),
                      grad_teacher_scale]
        else:
            grads += [None, None, None]
        return (*[g if need else None for g, need in zip(grads, needs)], None)


def _check_pair(op: str, query_name: str, query, keys_name: str, keys) -> None:
    _validation.check_tensor(op, query_name, query, contrastive.FEATURE_DTYPES)
    _validation.check_tensor(op, keys_name, keys, contrastive.FEATURE_DTYPES)
    for name, value in ((query_name, query), (keys_name, keys)):
        if value.dim() != 2:
            raise ValueError(f"{op}: argument '{name}' must be 2-D, got shape {tuple(value.shape)}")
        if value.shape[0] == 0 or value.shape[1] == 0:
            raise ValueError(f"{op}: argument '{name}' is empty (shape {tuple(value.shape)}): the loss is undefined")
    if keys.dtype != query.dtype:
        raise TypeError(f"{op}: argument '{keys_name}' has dtype {keys.dtype} but '{query_name}' has dtype "
                        f"{query.dtype}")
    if keys.device != query.device:
        raise ValueError(f"{op}: argument '{keys_name}' is on {keys.device} but '{query_name}' is on "
                         f"{query.device}")
    if keys.shape[1] != query.shape[1]:
        raise ValueError(f"{op}: arguments '{query_name}' {tuple(query.shape)} and '{keys_name}' "
                         f"{tuple(keys.shape)} must have the same feature width")


def distillation_rows(query: Tensor, keys: Tensor, logit_scale, teacher_query: Tensor, teacher_keys: Tensor,
                      teacher_logit_scale, *, block_size: int | None = None) -> Tensor:
    """Per row i of the student logits S = s Q K^T (n, m) and the teacher's T = t Qt Kt^T:
    ``-sum_j softmax(T)_ij log_softmax(S)_ij``, as an (n,) tensor, without the n x m matrices.

    Args:
        query (n, D), keys (m, D): the student's features (one dtype); teacher_query (n, Dt), teacher_keys (m, Dt):
            the teacher's (one dtype, any width Dt, same device).
        logit_scale, teacher_logit_scale: the multipliers (open_clip's ``logit_scale.exp()``): finite positive
            numbers or 0-dim tensors (learnable: they get gradients).
        block_size: rows per block (default: as many as keep one block x m float32 matrix at 4 MiB).
    Returns:
        (n,) float32 (float64 for float64 student features); gradients reach every input that requires one.
    """
    op = "leanops.distill.distillation_rows"
    _check_pair(op, "query", query, "keys", keys)
    _check_pair(op, "teacher_query", teacher_query, "teacher_keys", teacher_keys)
    for name, value, like_name, like in (("teacher_query", teacher_query, "query", query),
                                         ("teacher_keys", teacher_keys, "keys", keys)):
        if value.shape[0] != like.shape[0]:
            raise ValueError(f"{op}: argument '{name}' has {value.shape[0]} rows but '{like_name}' has "
                             f"{like.shape[0]}")
        if value.device != like.device:
            raise ValueError(f"{op}: argument '{name}' is on {value.device} but '{like_name}' is on {like.device}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{op}: argument 'block_size' must be a positive int or None, got {block_size!r}")
    # The statistics dtype: float64 for float64 student features, else float32 (numbers come back as float32).
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = contrastive._scalar_parameter(op, "logit_scale", logit_scale, query, allow_vector=False,
                                          positive=True).to(dtype)
    teacher_scale = contrastive._scalar_parameter(op, "teacher_logit_scale", teacher_logit_scale, query,
                                                  allow_vector=False, positive=True).to(dtype)
    block = _block_rows(query.shape[0], keys.shape[0], block_size)
    return _DistillationRows.apply(query, keys, scale, teacher_query, teacher_keys, teacher_scale, block)


def distillation_loss(image_features: Tensor, text_features: Tensor, logit_scale, teacher_image_features: Tensor,
                      teacher_text_features: Tensor, teacher_logit_scale, *,
                      block_size: int | None = None) -> Tensor:
    """open_clip's ``DistillClipLoss`` distillation term on one device, without the B x B logits:
    1/2 (dist(T, S) + dist(T^T, S^T)) with S = s X Y^T, T = t U V^T (module docstring).

    Args:
        image_features, text_features: the student's (B, D); teacher_image_features, teacher_text_features: the
            teacher's (B, Dt). logit_scale, teacher_logit_scale: the multipliers. block_size: as
            ``distillation_rows``'.
    Returns:
        The loss, float32 (float64 for float64 features).
    """
    image_to_text = distillation_rows(image_features, text_features, logit_scale, teacher_image_features,
                                      teacher_text_features, teacher_logit_scale, block_size=block_size)
    text_to_image = distillation_rows(text_features, image_features, logit_scale, teacher_text_features,
                                      teacher_image_features, teacher_logit_scale, block_size=block_size)
    return 0.5 * (image_to_text.mean() + text_to_image.mean())
