"""leanops as a drop-in for open_clip's losses, single process: ``leanops.integrations.open_clip.patch()`` makes
``open_clip.create_loss(args)`` return the leanops modules, whose values and parameter gradients equal open_clip's
on tiny open_clip models built from a config (nothing downloaded): CLIP, SigLIP, CoCa (from the logits, and lean
from the decoder's hidden states) and distillation; open_clip's forward signatures (positions, ``**model_out`` with
a ``logit_bias``, ``output_dict``); options leanops cannot honour are refused by name."""
import argparse
import copy
import sys
import types

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is installed by scripts/setup.sh")

import open_clip.loss as open_clip_loss  # noqa: E402
from open_clip.coca_model import CoCa  # noqa: E402
from open_clip.model import CLIP  # noqa: E402

import leanops.integrations.open_clip as lean_open_clip  # noqa: E402
import leanops.nn  # noqa: E402

VISION = dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16, mlp_ratio=2.0)
TEXT = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
MULTIMODAL = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1, attn_pooler_heads=2)
BATCH = 5


def tiny_clip(embed_dim=16, seed=0, siglip=False, dtype=torch.float64):
    torch.manual_seed(seed)
    model = CLIP(embed_dim, VISION, TEXT, init_logit_scale=2.0, init_logit_bias=-3.0 if siglip else None,
                 output_dict=True)
    return model.to(dtype)


def tiny_coca(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    vision = dict(VISION, attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=5,
                  output_tokens=True)
    text = dict(TEXT, embed_cls=True, output_tokens=True)
    model = CoCa(32, MULTIMODAL, text, vision, init_logit_scale=2.0)
    # open_clip leaves the decoder's output projection uninitialised (torch.empty): garbage, NaN at times.
    torch.nn.init.normal_(model.text_decoder.text_projection, std=32 ** -0.5)
    return model.to(dtype)


def batch(seed=1, size=BATCH, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 16, 16, generator=generator, dtype=dtype)
    # Token 0 is CoCa's padding: some of it at the ends.
    texts = torch.randint(1, 50, (size, 8), generator=generator)
    texts[:, 6:] = 0
    texts[0, 4:] = 0
    return images, texts


def training_args(**overrides):
    """The fields of open_clip_train's arguments that create_loss reads, at their defaults."""
    values = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False, gather_with_grad=False, rank=0,
                  world_size=1, horovod=False, coca_caption_loss_weight=2.0, coca_contrastive_loss_weight=1.0,
                  loss_dist_impl=None)
    values.update(overrides)
    return argparse.Namespace(**values)


def losses_and_gradients(model, criterion, images, texts, teacher=None):
    """open_clip_train's step: loss(**model_out, output_dict=True), summed, backpropagated."""
    model.zero_grad(set_to_none=True)
    model_out = model(images, texts)
    if teacher is not None:
        with torch.no_grad():
            model_out.update({f"dist_{k}": v for k, v in teacher(images, texts).items()})
    losses = criterion(**model_out, output_dict=True)
    sum(losses.values()).backward()
    return ({k: v.detach() for k, v in losses.items()},
            {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})


def assert_same(expected, actual, rtol=1e-10, atol=1e-12):
    expected_losses, expected_grads = expected
    losses, grads = actual
    assert set(losses) == set(expected_losses)
    for key in expected_losses:
        torch.testing.assert_close(losses[key].double(), expected_losses[key].double(), rtol=rtol, atol=atol,
                                   msg=key)
    assert set(grads) == set(expected_grads)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture
def patched():
    lean_open_clip.patch()
    yield
    lean_open_clip.unpatch()


def test_patch_swaps_the_loss_factory_and_unpatch_restores_it(monkeypatch):
    original = open_clip.create_loss
    # open_clip_train.main did `from open_clip import create_loss`; imported before patch(), its own name is patched
    # too. (A stand-in: the real module needs open_clip's training extras, webdataset and pandas.)
    train_main = types.ModuleType("open_clip_train.main")
    train_main.create_loss = original
    monkeypatch.setitem(sys.modules, "open_clip_train.main", train_main)
    lean_open_clip.patch()
    try:
        assert lean_open_clip.patched() and train_main.create_loss is open_clip.create_loss
        lean_open_clip.patch()  # idempotent
        assert isinstance(open_clip.create_loss(training_args()), leanops.nn.ClipLoss)
        siglip = open_clip.create_loss(training_args(siglip=True, loss_dist_impl="gather"))
        assert isinstance(siglip, leanops.nn.SigLipLoss) and siglip.dist_impl == "gather"
        coca = open_clip.factory.create_loss(training_args(model="coca_ViT-B-32"))
        assert isinstance(coca, leanops.nn.CoCaLoss) and coca.caption_loss_weight == 2.0
        distill = open_clip.create_loss(training_args(distill=True, local_loss=True, gather_with_grad=True))
        assert isinstance(distill, leanops.nn.DistillClipLoss) and distill.local_loss and distill.gather_with_grad
        with pytest.raises(ValueError, match="use_horovod=True"):
            open_clip.create_loss(training_args(horovod=True))
    finally:
        lean_open_clip.unpatch()
    assert open_clip.create_loss is original and train_main.create_loss is original
    assert open_clip.factory.create_loss is original and not lean_open_clip.patched()
    # A training module imported while patched took leanops' factory: unpatch() restores its name too.
    lean_open_clip.patch()
    late = types.ModuleType("training.main")
    late.create_loss = open_clip.create_loss
    monkeypatch.setitem(sys.modules, "training.main", late)
    lean_open_clip.unpatch()
    assert late.create_loss is original and open_clip.create_loss is original


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_tiny_model_losses_and_gradients_equal_open_clips(siglip, patched):
    args = training_args(siglip=siglip)
    images, texts = batch()
    model = tiny_clip(siglip=siglip)
    expected = losses_and_gradients(model, lean_open_clip.original_create_loss()(args), images,
                                    texts)
    criterion = open_clip.create_loss(args)
    assert type(criterion).__module__ == "leanops.nn"
    assert_same(expected, losses_and_gradients(model, criterion, images, texts))


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_float32_on_the_default_backend(siglip):
    """The default backend (the C++ kernels on the CPU) in float32, within float32 accuracy of open_clip's."""
    images, texts = batch(dtype=torch.float32)
    model = tiny_clip(siglip=siglip, dtype=torch.float32)
    reference = open_clip_loss.SigLipLoss() if siglip else open_clip_loss.ClipLoss()
    lean = leanops.nn.SigLipLoss() if siglip else leanops.nn.ClipLoss()
    assert_same(losses_and_gradients(model, reference, images, texts), losses_and_gradients(model, lean, images,
                                                                                            texts),
                rtol=2e-4, atol=1e-5)


def test_clip_loss_takes_a_logit_bias_as_open_clip_does():
    """A SigLIP-style model (with logit_bias) trained with the CLIP loss: loss(**model_out) works, the bias shifts
    every logit (no change to the softmax) and gets a zero gradient, as in open_clip."""
    images, texts = batch()
    model = tiny_clip(siglip=True)
    expected = losses_and_gradients(model, open_clip_loss.ClipLoss(), images, texts)
    actual = losses_and_gradients(model, leanops.nn.ClipLoss(), images, texts)
    assert_same(expected, actual)
    assert actual[1]["logit_bias"].abs().max() == 0


def test_forward_arguments_keep_open_clips_positions():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=generator, dtype=torch.float64), torch.randn(6, 4, generator=generator,
                                                                                      dtype=torch.float64)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    for reference, lean in ((open_clip_loss.ClipLoss(), leanops.nn.ClipLoss()),
                            (open_clip_loss.SigLipLoss(), leanops.nn.SigLipLoss())):
        # logit_bias 4th, output_dict 5th, as open_clip's.
        expected, actual = reference(x, y, scale, bias, True), lean(x, y, scale, bias, True)
        assert set(actual) == set(expected) == {"contrastive_loss"}
        torch.testing.assert_close(actual["contrastive_loss"], expected["contrastive_loss"])
    expected = open_clip_loss.DistillClipLoss()(x, y, scale, y, x, scale, True)
    actual = leanops.nn.DistillClipLoss()(x, y, scale, y, x, scale, True)
    assert set(actual) == set(expected) == {"contrastive_loss", "distill_loss"}
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


@pytest.mark.parametrize("route", ["logits", "lean_coca", "patch"])
def test_coca_equals_open_clips(route):
    """CoCa: from the caption logits (open_clip's model unchanged), and lean: lean_coca(model) or
    patch(lean_caption=True) make forward return the decoder's hidden states, and the caption loss goes through
    linear_cross_entropy; the values and every parameter's gradient equal open_clip's."""
    images, texts = batch()
    model = tiny_coca()
    expected = losses_and_gradients(model, open_clip_loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0),
                                    images, texts)
    lean_model = copy.deepcopy(model)
    if route == "lean_coca":
        lean_open_clip.lean_coca(lean_model)
    elif route == "patch":
        lean_open_clip.patch(lean_caption=True)
    try:
        if route != "logits":
            out = lean_model(images, texts)
            assert "logits" not in out and out["caption_hidden_states"].shape == (BATCH, 7, 32)
        actual = losses_and_gradients(lean_model, leanops.nn.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0),
                                      images, texts)
    finally:
        lean_open_clip.unpatch()
    assert "logits" in model(images, texts)  # the class itself is restored
    assert_same(expected, actual)


def test_coca_without_the_contrastive_term_and_its_argument_checks():
    images, texts = batch()
    model = tiny_coca()
    expected = losses_and_gradients(model, open_clip_loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0),
                                    images, texts)
    actual = losses_and_gradients(model, leanops.nn.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0), images,
                                  texts)
    assert_same(expected, actual)
    out = model(images, texts)
    criterion = leanops.nn.CoCaLoss(1.0, 1.0)
    with pytest.raises(ValueError, match="exactly one of 'logits'"):
        criterion(out["image_features"], out["text_features"], None, out["labels"], out["logit_scale"])
    with pytest.raises(ValueError, match="'caption_projection'"):
        criterion(out["image_features"], out["text_features"], labels=out["labels"], logit_scale=out["logit_scale"],
                  caption_hidden_states=out["logits"])


def test_distillation_equals_open_clips(patched):
    """DistillClipLoss through the patched factory: a student and a teacher of another width, the teacher under
    no_grad as open_clip_train runs it."""
    args = training_args(distill=True)
    images, texts = batch()
    student, teacher = tiny_clip(), tiny_clip(embed_dim=12, seed=5)
    expected = losses_and_gradients(student, lean_open_clip.original_create_loss()(args), images,
                                    texts, teacher)
    criterion = open_clip.create_loss(args)
    assert isinstance(criterion, leanops.nn.DistillClipLoss)
    assert_same(expected, losses_and_gradients(student, criterion, images, texts, teacher))


def test_options_leanops_cannot_honour_are_refused_by_name():
    with pytest.raises(ValueError, match="use_horovod=True"):
        leanops.nn.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="use_horovod=True"):
        leanops.nn.CoCaLoss(1.0, 1.0, use_horovod=True)
    with pytest.raises(ValueError, match="'dist_impl'"):
        leanops.nn.SigLipLoss(dist_impl="allreduce")
    with pytest.raises(ValueError, match="'rank'"):
        leanops.nn.ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="'reduction' must be 'mean'"):
        leanops.nn.ClipLoss(world_size=2, reduction="sum")
    with pytest.raises(ValueError, match="'distributed'"):
        leanops.nn.SigLipLoss(distributed="allreduce")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'distributed' needs open_clip's world_size"):
        leanops.nn.DistillClipLoss(distributed="ring")(x, x, 10.0, x, x, 10.0)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="world_size=2 needs an initialised"):
            leanops.nn.ClipLoss(rank=1, world_size=2)(x, x, 10.0)
        with pytest.raises(RuntimeError, match="world_size=2 needs an initialised"):
            leanops.nn.SigLipLoss(rank=1, world_size=2)(x, x, 10.0, 0.0)
