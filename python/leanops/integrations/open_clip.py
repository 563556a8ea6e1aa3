"""open_clip: its training losses without the B x B logits, in one line.

``patch()`` replaces open_clip's loss factory, ``open_clip.create_loss(args)`` (the one ``open_clip_train`` calls),
with ``create_loss`` below: the same choice of loss from the same ``args`` (``distill``, ``model`` containing "coca",
``siglip``, else CLIP) and the same constructor arguments, returning the ``leanops.nn`` modules (``ClipLoss``,
``SigLipLoss``, ``CoCaLoss``, ``DistillClipLoss``), whose values and gradients are open_clip's, single process and
distributed (``leanops.nn``'s docstring maps open_clip's distributed options onto leanops'). ``unpatch()`` restores
open_clip's. A training run::

    import sys
    import leanops.integrations.open_clip
    leanops.integrations.open_clip.patch()
    from open_clip_train.main import main
    main(sys.argv[1:])

(``python -m open_clip_train.main ...`` becomes ``python train_lean.py ...`` with the same arguments.)

CoCa's caption loss stays open_clip's (the model computes the logits) unless the model returns its decoder's
hidden states instead: ``lean_coca(model)`` (or ``patch(lean_caption=True)``, for every CoCa model) makes
``forward`` return ``caption_hidden_states`` and ``caption_projection`` in place of ``logits``, and ``CoCaLoss``
computes the caption cross-entropy through ``leanops.linear_cross_entropy``, without the N x L x V logits.
(open_clip_train's evaluation skips its generative loss when ``logits`` are absent.)

Nothing here imports open_clip until ``patch()`` (or ``lean_coca``) is called.
"""
import functools
import sys
import types

from .. import nn

_ORIGINALS: dict = {}


def create_loss(args, *, backend: str = "auto"):
    """open_clip's ``create_loss(args)`` with the leanops modules (``args`` as open_clip_train's: ``distill``,
    ``model``, ``siglip``, ``local_loss``, ``gather_with_grad``, ``rank``, ``world_size``, ``horovod``,
    ``coca_caption_loss_weight``, ``coca_contrastive_loss_weight``, ``loss_dist_impl``)."""
    distributed = dict(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                       rank=args.rank, world_size=args.world_size, use_horovod=args.horovod)
    if args.distill:
        return nn.DistillClipLoss(**distributed, backend=backend)
    if "coca" in args.model.lower():
        return nn.CoCaLoss(caption_loss_weight=args.coca_caption_loss_weight,
                           clip_loss_weight=args.coca_contrastive_loss_weight, **distributed, backend=backend)
    if args.siglip:
        if args.horovod:
            raise ValueError("leanops.integrations.open_clip.create_loss: Horovod is not supported for SigLIP "
                             "(nor by open_clip); launch with torchrun")
        return nn.SigLipLoss(rank=args.rank, world_size=args.world_size,
                             dist_impl=getattr(args, "loss_dist_impl", None), backend=backend)
    return nn.ClipLoss(**distributed, backend=backend)


def _lean_coca_forward(model, image, text=None, image_latent=None, image_embs=None, output_labels: bool = True):
    """CoCa.forward with the text decoder stopped before its output projection (module docstring)."""
    decoder = model.text_decoder
    projection = decoder.text_projection
    if projection is None or not hasattr(projection, "dim") or projection.dim() != 2:
        raise TypeError("leanops.integrations.open_clip.lean_coca: the model's text_decoder.text_projection must be "
                        f"a (D, V) tensor, got {type(projection).__name__}")
    decoder.text_projection = None  # the decoder then returns ln_final's output: the hidden states
    try:
        out = _ORIGINALS.get("CoCa.forward", type(model).forward)(model, image, text, image_latent, image_embs,
                                                                  output_labels)
    finally:
        decoder.text_projection = projection
    if "logits" in out:
        out["caption_hidden_states"] = out.pop("logits")
        out["caption_projection"] = projection
    return out


def lean_coca(model):
    """Make this open_clip ``CoCa`` model's forward return ``caption_hidden_states`` (N, L, D) and
    ``caption_projection`` (D, V) instead of ``logits`` (N, L, V), for ``leanops.nn.CoCaLoss``. Returns the model
    (the open_clip model itself: ``lean_coca(ddp_model.module)`` once wrapped in DistributedDataParallel, whose
    forward calls the model's)."""
    model.forward = types.MethodType(_lean_coca_forward, model)
    return model


def _factory_holders():
    """The modules whose ``create_loss`` name open_clip_train may call."""
    import open_clip
    import open_clip.factory

    holders = [open_clip, open_clip.factory]
    for name in ("open_clip_train.main", "training.main"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "create_loss"):
            holders.append(module)
    return holders


def patch(*, backend: str = "auto", lean_caption: bool = False) -> None:
    """Swap leanops' losses into open_clip: ``open_clip.create_loss`` (and the name open_clip_train's main module
    imported, if it is imported already) become ``create_loss`` above. ``lean_caption=True`` also makes every
    ``open_clip.CoCa`` return its decoder's hidden states (``lean_coca``). Idempotent; ``unpatch()`` undoes it."""
    import open_clip.coca_model
    import open_clip.factory

    replacement = functools.partial(create_loss, backend=backend)
    replacement.leanops = True
    if not getattr(open_clip.factory.create_loss, "leanops", False):
        _ORIGINALS["create_loss"] = open_clip.factory.create_loss
    for holder in _factory_holders():
        holder.create_loss = replacement
    if lean_caption and "CoCa.forward" not in _ORIGINALS:
        _ORIGINALS["CoCa.forward"] = open_clip.coca_model.CoCa.forward
        open_clip.coca_model.CoCa.forward = _lean_coca_forward


def unpatch() -> None:
    """Restore what ``patch()`` replaced (also in a training module imported after ``patch()``)."""
    if "CoCa.forward" in _ORIGINALS:
        import open_clip.coca_model

        open_clip.coca_model.CoCa.forward = _ORIGINALS.pop("CoCa.forward")
    if "create_loss" in _ORIGINALS:
        original = _ORIGINALS.pop("create_loss")
        for holder in _factory_holders():
            if getattr(holder.create_loss, "leanops", False):
                holder.create_loss = original


def original_create_loss():
    """open_clip's own ``create_loss`` (also while patched)."""
    import open_clip.factory

    return _ORIGINALS.get("create_loss", open_clip.factory.create_loss)


def patched() -> bool:
    """Whether ``open_clip.create_loss`` is leanops' now."""
    import open_clip

    return getattr(open_clip.create_loss, "leanops", False)
