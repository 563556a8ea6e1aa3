"""Hugging Face ``transformers`` causal language models: their training loss without the N x V logits.

``model(input_ids, labels=labels).loss`` builds the logits of every position (batch x sequence x vocabulary, in
float32 for the loss) and calls the model's ``loss_function`` (``ForCausalLMLoss``). Two entry points avoid that:

- ``apply(model)`` patches one model instance (reversibly, ``revert(model)``; or ``with applied(model): ...``): its
  own ``forward`` then returns its usual ``.loss`` computed by ``leanops.linear_cross_entropy`` whenever labels are
  given in training mode, with ``.logits = None``; without labels (generation) or in eval mode it runs unchanged.
  ``Trainer.train()`` and ``Trainer.evaluate()`` need no subclass. In the manner of Liger-Kernel's
  ``apply_liger_kernel_to_llama`` / ``AutoLigerKernelForCausalLM``; ``from_pretrained(...)`` loads and applies.
- ``causal_lm_loss(model, input_ids, labels)`` returns that loss of an unpatched model for one call.

How: the model's own ``forward`` runs as written (decoder, Mixtral's router auxiliary loss, output classes,
``return_dict``), with two of its parts stood in for during the call. ``lm_head`` records the final hidden states
it receives and returns a one-column probe instead of the logits; ``self.loss_function`` (which every
``*ForCausalLM`` of transformers >= 4.46 calls with the logits and the labels) returns
``linear_cross_entropy(hidden, lm_head.weight, shifted labels)``. What the forward does to the logits in between
(Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``) is read from the
config, turned into leanops' ``softcap`` and a scale of the hidden states, and checked once per model on the probe:
a model that does something else to its logits is refused, never silently given another loss. The label semantics
are the model's:

- labels are the inputs' own ids; position i predicts label i + 1 (labels are shifted left and the last position
  gets ``ignore_index``), unless ``shift_labels`` are given already shifted;
- the mean over labels that are not ``ignore_index`` (NaN when there are none, as the model's own), or, with
  ``num_items_in_batch`` (what the Trainer passes for gradient accumulation), the sum divided by it.

Nothing here imports ``transformers``: a ``torch.nn.Module`` with ``config``, ``get_output_embeddings()`` (a
``torch.nn.Linear``) and a ``forward`` that calls it and then ``self.loss_function`` in the Hugging Face manner works.
"""
import contextlib
import functools
import inspect
import types

import torch
import torch.nn.functional as F

from ..cross_entropy import linear_cross_entropy

__all__ = ["apply", "revert", "applied", "is_applied", "from_pretrained", "causal_lm_loss"]

Tensor = torch.Tensor

_PATCH = "_leanops_patch"              # the instance attribute holding an applied model's _Patch
_INTERCEPTION = "_leanops_interception"  # set on a model while one of its forward calls is intercepted
_PROBE_RANGE = 40.0                    # probe logits span [-40, 40]: every known transform moves them visibly


def _text_config(config):
    """The config that holds the language model's settings (a multimodal config's text_config)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) such that the model's logits are softcap(scale * (lm_head output)), from its config."""
    text = _text_config(config)
    scale = 1.0
    for name, power in (("logit_scale", 1), ("output_multiplier", 1), ("logits_scaling", -1)):
        value = getattr(text, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale *= float(value) ** power
    softcap = getattr(text, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def _output_head(model, op: str) -> torch.nn.Linear:
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "get_output_embeddings", None)) \
            or getattr(model, "config", None) is None:
        raise TypeError(f"{op}: argument 'model' ({type(model).__name__}) is not a Hugging Face *ForCausalLM: "
                        f"expected a torch.nn.Module with get_output_embeddings() and config")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{op}: argument 'model' has an output head of type {type(head).__name__}; expected "
                        f"torch.nn.Linear (lm_head)")
    if not head.weight.is_floating_point():
        raise TypeError(f"{op}: argument 'model' has an lm_head weight of dtype {head.weight.dtype} (quantized?); "
                        f"expected a floating-point torch.nn.Linear")
    return head


def _check_causal_lm_loss_function(model, op: str) -> None:
    loss_function = getattr(model, "loss_function", None)
    name = getattr(loss_function, "__name__", type(loss_function).__name__)
    if name != "ForCausalLMLoss":
        raise ValueError(f"{op}: argument 'model' ({type(model).__name__}) computes its loss with {name}, not "
                         f"transformers' ForCausalLMLoss: leanops computes only the causal LM loss")


def _loss_from_hidden(op: str, hidden: Tensor, head: torch.nn.Linear, config, labels: Tensor | None,
                      shift_labels: Tensor | None, num_items_in_batch, ignore_index: int, backend: str) -> Tensor:
    """The model's ForCausalLMLoss of logits softcap(scale * head(hidden)), without them."""
    name = "labels" if shift_labels is None else "shift_labels"
    given = labels if shift_labels is None else shift_labels
    if not isinstance(given, Tensor) or given.dtype != torch.int64:
        raise TypeError(f"{op}: argument '{name}' must be an int64 tensor of token ids, got "
                        f"{given.dtype if isinstance(given, Tensor) else type(given).__name__}")
    scale, softcap = _logit_transform(config)
    if scale != 1.0:
        hidden = hidden * scale
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
                                softcap=softcap, reduction="sum", backend=backend)
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class _Patch:
    """What apply() keeps on a model instance."""

    def __init__(self, original_forward, backend: str, skip_logits: bool | None):
        self.original_forward = original_forward
        self.backend = backend
        self.skip_logits = skip_logits
        self.enabled = True
        self.previous = None   # an instance forward installed before apply(), restored by revert()
        self.installed = None  # the patched forward apply() installed
        self.verified = False  # the probe check passed once (see _Interception.loss_function)
        parameters = list(inspect.signature(original_forward).parameters)
        self.labels_position = parameters.index("labels") if "labels" in parameters else None


class _Interception:
    """During one forward call of `model`: lm_head records its input and returns a probe; loss_function computes
    linear_cross_entropy from the recorded hidden states. Restores both on exit."""

    def __init__(self, model, head: torch.nn.Linear, op: str, backend: str, patch: _Patch | None):
        self.model, self.head, self.op, self.backend, self.patch = model, head, op, backend, patch
        self.hidden = self.probe = None
        self.head_calls = self.loss_calls = 0

    def head_forward(self, hidden: Tensor) -> Tensor:
        self.head_calls += 1
        self.hidden = hidden
        positions = hidden.shape[:-1]
        # Distinct values per position (float32, whatever the model's dtype): the model's transform of its logits
        # is checked on them (see loss_function).
        self.probe = torch.linspace(-_PROBE_RANGE, _PROBE_RANGE, positions.numel(), dtype=torch.float32,
                                    device=hidden.device).view(*positions, 1)
        return self.probe

    def loss_function(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        self.loss_calls += 1
        model_name = type(self.model).__name__
        if self.head_calls != 1 or not isinstance(logits, Tensor) or logits.shape != self.probe.shape:
            raise RuntimeError(f"{self.op}: {model_name}.forward does not compute its loss as "
                               f"self.loss_function(self.lm_head(hidden), labels): lm_head called {self.head_calls} "
                               f"time(s) before it; leanops cannot compute this model's loss without its logits")
        check = self.patch is None or not self.patch.verified
        if check and not torch.compiler.is_compiling():
            scale, softcap = _logit_transform(self.model.config)
            expected = self.probe * scale
            if softcap is not None:
                expected = softcap * torch.tanh(expected / softcap)
            if not torch.allclose(logits.detach().float(), expected, rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"{self.op}: {model_name}.forward transforms lm_head's output in a way leanops "
                                   f"does not know (it knows final_logit_softcapping, logit_scale, "
                                   f"output_multiplier and logits_scaling in the config): refusing rather than "
                                   f"computing another loss")
            if self.patch is not None:
                self.patch.verified = True
        return _loss_from_hidden(self.op, self.hidden, self.head, self.model.config, labels, shift_labels,
                                 num_items_in_batch, ignore_index, self.backend)

    def __enter__(self):
        model, head = self.model, self.head
        # transformers' PreTrainedModel.loss_function is a property whose setter stores _loss_function.
        self._loss_attribute = "_loss_function" if isinstance(getattr(type(model), "loss_function", None),
                                                              property) else "loss_function"
        self._head_forward = head.__dict__.get("forward")
        self._loss_function = model.__dict__.get(self._loss_attribute)
        head.forward = self.head_forward
        model.loss_function = self.loss_function
        model.__dict__[_INTERCEPTION] = self
        return self

    def __exit__(self, *exc):
        model, head = self.model, self.head
        model.__dict__.pop(_INTERCEPTION, None)
        if self._head_forward is None:
            head.__dict__.pop("forward", None)
        else:
            head.__dict__["forward"] = self._head_forward
        if self._loss_function is None:
            model.__dict__.pop(self._loss_attribute, None)
        else:
            model.__dict__[self._loss_attribute] = self._loss_function
        return False

    def finish(self, output):
        """The model's output without the probe logits: `logits=None` (a tuple output omits it, as Hugging Face
        omits every None field)."""
        if self.loss_calls != 1:
            raise RuntimeError(f"{self.op}: {type(self.model).__name__}.forward computed its loss without calling "
                               f"self.loss_function ({self.loss_calls} calls); leanops cannot compute this model's "
                               f"loss without its logits")
        if isinstance(output, dict):  # a transformers ModelOutput (an OrderedDict dataclass)
            return type(output)(**{key: value for key, value in output.items() if key != "logits"})
        return output


def _return_dict(model, kwargs) -> bool:
    value = kwargs.pop("return_dict", None)
    if value is None:
        value = getattr(model.config, "return_dict", True)
    return bool(value)


def _run_without_logits(model, forward, args, kwargs, op: str, backend: str, patch: _Patch | None):
    """forward(*args, **kwargs) with labels, its loss through linear_cross_entropy and no logits."""
    head = _output_head(model, op)
    return_dict = _return_dict(model, kwargs)
    with _Interception(model, head, op, backend, patch) as interception:
        output = forward(*args, return_dict=True, **kwargs)
    output = interception.finish(output)
    return output if return_dict or not isinstance(output, dict) else output.to_tuple()


def _patched_forward(model, patch: "_Patch", args, kwargs):
    """The forward apply() installs: see apply()."""
    skip_logits = kwargs.pop("skip_logits", None)
    if not patch.enabled or _INTERCEPTION in model.__dict__:  # reverted, or inside causal_lm_loss's interception
        return patch.original_forward(*args, **kwargs)
    labels_given = kwargs.get("labels") is not None or (
        patch.labels_position is not None and len(args) > patch.labels_position
        and args[patch.labels_position] is not None)
    has_labels = labels_given or kwargs.get("shift_labels") is not None
    if skip_logits is None:
        skip_logits = patch.skip_logits
    if skip_logits is None:
        skip_logits = model.training and has_labels
    if not skip_logits:
        return patch.original_forward(*args, **kwargs)
    if not has_labels:
        raise ValueError("leanops.integrations.transformers: argument 'skip_logits' is True but neither 'labels' nor "
                         "'shift_labels' was given: without them there is no loss to compute, only the logits")
    if not labels_given:  # the model computes a loss only when labels are given; shift_labels take precedence
        kwargs["labels"] = kwargs["shift_labels"]
    return _run_without_logits(model, patch.original_forward, args, kwargs, f"{type(model).__name__}.forward",
                               patch.backend, patch)


def apply(model: torch.nn.Module, *, backend: str = "auto", skip_logits: bool | None = None) -> torch.nn.Module:
    """Make ``model``'s own forward compute its loss with ``leanops.linear_cross_entropy``, without the logits.

    Patches this instance only (its ``forward`` and, during a call, its ``lm_head`` and ``loss_function``); other
    instances of the class are untouched. Applying again updates the options. Undo with ``revert(model)``.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (Llama, Mistral, Qwen2, Gemma 2, Mixtral, ...) whose
            ``get_output_embeddings()`` is a ``torch.nn.Linear`` and whose loss is ``ForCausalLMLoss``.
        backend: the leanops backend of the loss ("auto": the fastest for the device).
        skip_logits: when the forward skips the logits and computes the loss without them. None (default): when
            labels (or ``shift_labels``) are given and ``model.training``; in eval mode the model runs as written,
            logits and its own loss, so that ``Trainer.evaluate()`` with ``compute_metrics`` and anything else that
            wants logits with the loss keeps working. True: whenever labels are given (lean evaluation: the
            Trainer's ``eval_loss`` without logits; ``compute_metrics`` then gets none). False: never (the patch is
            inert). A call can override it with a ``skip_logits=`` keyword argument (as Liger-Kernel's, which the
            Trainer passes with ``use_liger_kernel``).

    With the logits skipped the output is the model's own class (``CausalLMOutputWithPast``,
    ``MoeCausalLMOutputWithPast`` with Mixtral's ``aux_loss`` included in ``.loss`` as the model does) with
    ``.loss`` and ``logits=None``; ``return_dict=False`` gives its tuple without the logits. ``num_items_in_batch``,
    ``shift_labels`` and ``ignore_index`` keyword arguments mean what they mean to the model.

    Returns:
        ``model`` itself.
    Raises:
        TypeError / ValueError naming 'model' for a model this cannot serve (no Linear lm_head, another loss).
    """
    op = "leanops.integrations.transformers.apply"
    _output_head(model, op)
    _check_causal_lm_loss_function(model, op)
    if not isinstance(backend, str):
        raise TypeError(f"{op}: argument 'backend' must be a string, got {type(backend).__name__}")
    if skip_logits is not None and not isinstance(skip_logits, bool):
        raise TypeError(f"{op}: argument 'skip_logits' must be None, True or False, got {skip_logits!r}")
    patch = model.__dict__.get(_PATCH)
    if patch is not None:
        patch.backend, patch.skip_logits = backend, skip_logits
        return model
    patch = _Patch(model.forward, backend, skip_logits)
    patch.previous = model.__dict__.get("forward")
    original = patch.original_forward
    if inspect.ismethod(original):
        # A bound method, as the class's forward: accelerate's mixed-precision wrapper (and others) read __func__.
        def forward(self, *args, **kwargs):
            return _patched_forward(self, patch, args, kwargs)

        functools.update_wrapper(forward, original.__func__)  # keeps the signature the Trainer inspects
        patch.installed = types.MethodType(forward, model)
    else:
        def forward(*args, **kwargs):
            return _patched_forward(model, patch, args, kwargs)

        functools.update_wrapper(forward, original)
        patch.installed = forward
    model.__dict__[_PATCH] = patch
    model.forward = patch.installed
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply(model)``: the model's forward is its own again. A model that was not applied is returned as is
    (if something wrapped the patched forward since, that wrapper stays and passes straight through)."""
    patch = model.__dict__.pop(_PATCH, None) if isinstance(model, torch.nn.Module) else None
    if patch is None:
        return model
    patch.enabled = False
    if model.__dict__.get("forward") is patch.installed:
        if patch.previous is None:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = patch.previous
    return model


def is_applied(model: torch.nn.Module) -> bool:
    """Whether ``apply(model)`` is in force."""
    patch = model.__dict__.get(_PATCH) if isinstance(model, torch.nn.Module) else None
    return patch is not None and patch.enabled


@contextlib.contextmanager
def applied(model: torch.nn.Module, *, backend: str = "auto", skip_logits: bool | None = None):
    """``with applied(model): ...`` applies the patch for the block and reverts it after (unless it was applied
    before)."""
    before = is_applied(model)
    apply(model, backend=backend, skip_logits=skip_logits)
    try:
        yield model
    finally:
        if not before:
            revert(model)


def from_pretrained(pretrained_model_name_or_path, *model_args, backend: str = "auto",
                    skip_logits: bool | None = None, **kwargs) -> torch.nn.Module:
    """``transformers.AutoModelForCausalLM.from_pretrained(...)``, then ``apply(model, backend=, skip_logits=)``
    (the counterpart of Liger-Kernel's ``AutoLigerKernelForCausalLM``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
    return apply(model, backend=backend, skip_logits=skip_logits)


def causal_lm_loss(model: torch.nn.Module, input_ids: Tensor | None = None, labels: Tensor | None = None, *,
                   shift_labels: Tensor | None = None, num_items_in_batch: Tensor | int | None = None,
                   ignore_index: int = -100, backend: str = "auto", **model_kwargs) -> Tensor:
    """The causal LM loss of a Hugging Face ``*ForCausalLM`` model without materializing its logits.

    Runs the model's own forward (so everything it adds to the loss, e.g. Mixtral's router auxiliary loss when
    ``output_router_logits``, is in it) with the logits replaced as described in the module's docstring; the
    model need not be patched by ``apply``.

    Args:
        model: e.g. ``LlamaForCausalLM``; its ``lm_head`` (``get_output_embeddings()``) must be a Linear layer.
        input_ids, model_kwargs: passed to the model as ``model(...)`` would (attention_mask, position_ids,
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
    _output_head(model, op)
    _check_causal_lm_loss_function(model, op)
    kwargs = dict(model_kwargs, input_ids=input_ids, labels=given)
    if shift_labels is not None:
        kwargs["shift_labels"] = shift_labels
    if num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch
    if ignore_index != -100:
        kwargs["ignore_index"] = ignore_index
    # Through model.__call__ (its hooks run); an applied model's patched forward sees the interception and passes
    # straight through to the model's own forward.
    return _run_without_logits(model, model, (), kwargs, op, backend, model.__dict__.get(_PATCH)).loss
