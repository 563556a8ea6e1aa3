"""Hugging Face ``transformers`` causal language models: their training loss without the N x V logits.

``model(input_ids, labels=labels).loss`` builds the logits of every position (batch x sequence x vocabulary, in
float32 for the loss) and calls ``ForCausalLMLoss``. ``causal_lm_loss(model, input_ids, labels)`` runs the model's
decoder to its final hidden states and hands them with ``lm_head``'s weight to ``leanops.linear_cross_entropy``,
with the same label semantics:

- labels are the inputs' own ids; position i predicts label i + 1 (labels are shifted left and the last position
  gets ``ignore_index``), unless ``shift_labels`` are given already shifted;
- the mean over labels that are not ``ignore_index``, or, with ``num_items_in_batch`` (what the Trainer passes for
  gradient accumulation), the sum divided by it;
- ``config.final_logit_softcapping`` (Gemma 2) becomes leanops' ``softcap``; ``config.logit_scale`` (Cohere), a
  multiplier of the logits, scales the hidden states instead (the same logits).

Nothing here imports ``transformers``: any model with ``base_model`` (or ``model``), ``get_output_embeddings()``
and ``config`` in the Hugging Face manner works.
"""
import torch
import torch.nn.functional as F

from ..cross_entropy import linear_cross_entropy

Tensor = torch.Tensor


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if decoder is None:
        raise TypeError(f"leanops.integrations.transformers: argument 'model' ({type(model).__name__}) has no "
                        f"decoder: expected a Hugging Face *ForCausalLM with `base_model` or `model`")
    return decoder


def causal_lm_loss(model: torch.nn.Module, input_ids: Tensor | None = None, labels: Tensor | None = None, *,
                   shift_labels: Tensor | None = None, num_items_in_batch: Tensor | int | None = None,
                   ignore_index: int = -100, backend: str = "auto", **model_kwargs) -> Tensor:
    """The causal LM loss of a Hugging Face ``*ForCausalLM`` model without materializing its logits.

    Args:
        model: e.g. ``LlamaForCausalLM``; its ``lm_head`` (``get_output_embeddings()``) must be a Linear layer.
        input_ids, model_kwargs: passed to the decoder as ``model(...)`` would (attention_mask, position_ids,
            inputs_embeds, ...).
        labels: (batch, sequence) token ids, ``ignore_index`` where no loss is wanted; shifted here. Or
        shift_labels: labels already aligned with the positions that predict them.
        num_items_in_batch: if given, the loss is the sum divided by it (the Trainer's gradient accumulation).
        backend: the leanops backend of the loss.
    Returns:
        The same value as ``model(input_ids, labels=labels, ...).loss`` (float32), with gradients for every
        parameter, through ``leanops.linear_cross_entropy``.
    """
    op = "leanops.integrations.transformers.causal_lm_loss"
    if (labels is None) == (shift_labels is None):
        raise ValueError(f"{op}: pass exactly one of the arguments 'labels' and 'shift_labels'")
    name = "labels" if labels is not None else "shift_labels"
    given = labels if labels is not None else shift_labels
    if not isinstance(given, Tensor) or given.dtype != torch.int64:
        raise TypeError(f"{op}: argument '{name}' must be an int64 tensor of token ids, got "
                        f"{given.dtype if isinstance(given, Tensor) else type(given).__name__}")
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(f"{op}: argument 'model' ({type(model).__name__}) is not a Hugging Face *ForCausalLM: "
                        f"expected a torch.nn.Module with get_output_embeddings() and config")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{op}: argument 'model' has an output head of type {type(head).__name__}; expected "
                        f"torch.nn.Linear (lm_head)")
    outputs = _decoder(model)(input_ids=input_ids, **model_kwargs)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
    config = model.config
    logit_scale = getattr(config, "logit_scale", None)
    if logit_scale is not None:
        hidden = hidden * logit_scale
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{op}: argument '{name}' must have shape {tuple(hidden.shape[:-1])} (the positions of the "
                         f"hidden states), got {tuple(given.shape)}")
    vocabulary = head.weight.shape[0]
    bad = (shift_labels != ignore_index) & ((shift_labels < 0) | (shift_labels >= vocabulary))
    if not torch.compiler.is_compiling() and bool(bad.any()):
        raise ValueError(f"{op}: argument '{name}' holds token ids outside [0, {vocabulary}) that are not "
                         f"ignore_index={ignore_index}: {shift_labels[bad][:5].tolist()}")
    # The sum, divided by the number of labels (the model's mean: NaN, as the model's own loss, when every label is
    # ignore_index) or by num_items_in_batch.
    loss = linear_cross_entropy(hidden, head.weight, shift_labels, bias=head.bias, ignore_index=ignore_index,
                                softcap=getattr(config, "final_logit_softcapping", None), reduction="sum",
                                backend=backend)
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
