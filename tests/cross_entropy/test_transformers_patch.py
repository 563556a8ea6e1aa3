"""leanops.integrations.transformers.apply(model): a Hugging Face *ForCausalLM's own forward computes its loss with
linear_cross_entropy and no logits, equal to the unpatched model's (value and every parameter's gradient), on tiny
randomly initialised Llama, Mistral, Qwen2, Gemma 2 (softcap) and Mixtral (router auxiliary loss) configurations
(nothing downloaded); generation, Trainer.train() and Trainer.evaluate() keep working."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import leanops.integrations.transformers as lt  # noqa: E402

VOCABULARY = 97
SIZES = dict(vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SIZES))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES))


def _gemma2():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SIZES, head_dim=8, final_logit_softcapping=3.0,
                                                                    attn_implementation="eager"))


def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SIZES, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1))


FAMILIES = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gemma2": _gemma2, "mixtral": _mixtral}


def _build(family):
    torch.manual_seed(0)
    return FAMILIES[family]().train()


def _batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCABULARY, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # a padded sequence
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :3] = -100  # a prompt the loss skips
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _grads(model):
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    return output, _grads(model)


def _assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def lce_calls(monkeypatch):
    """The calls of linear_cross_entropy the integration makes (their backends and num_items_in_batch)."""
    calls = []
    original_loss = lt._loss_from_hidden

    def loss_from_hidden(op, hidden, head, config, labels, shift_labels, num_items_in_batch, ignore_index, backend):
        calls.append(dict(num_items_in_batch=num_items_in_batch, backend=backend))
        return original_loss(op, hidden, head, config, labels, shift_labels, num_items_in_batch, ignore_index,
                             backend)

    monkeypatch.setattr(lt, "_loss_from_hidden", loss_from_hidden)
    return calls


@pytest.mark.parametrize("num_items_in_batch", [None, 17], ids=["mean", "num_items"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_loss_and_gradients_equal_the_unpatched_models(family, num_items_in_batch, lce_calls):
    model = _build(family)
    inputs = _batch()
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = num_items_in_batch
    expected, expected_grads = _loss_and_grads(model, **inputs)

    assert lt.apply(model) is model
    actual, actual_grads = _loss_and_grads(model, **inputs)

    assert len(lce_calls) == 1 and lce_calls[0]["num_items_in_batch"] == num_items_in_batch
    assert type(actual) is type(expected) and actual.logits is None
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(actual_grads, expected_grads)
    if family == "mixtral":  # the router's load-balancing loss is in .loss, as in the model's own
        assert expected.aux_loss is not None and expected.aux_loss > 0
        torch.testing.assert_close(actual.aux_loss, expected.aux_loss)
        assert not torch.allclose(actual.loss, expected.loss - 0.1 * expected.aux_loss)


def test_reference_backend_and_shift_labels(lce_calls):
    model = _build("gemma2")
    inputs = _batch()
    expected, expected_grads = _loss_and_grads(model, **inputs)
    lt.apply(model, backend="reference")
    actual, actual_grads = _loss_and_grads(model, **inputs)
    assert lce_calls[-1]["backend"] == "reference"
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(actual_grads, expected_grads)

    # shift_labels alone (already aligned with the positions) give the same loss; return_dict=False a tuple.
    shift_labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[..., 1:]
    by_shift = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], shift_labels=shift_labels)
    torch.testing.assert_close(by_shift.loss, expected.loss, rtol=1e-5, atol=1e-6)
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected.loss, rtol=1e-5, atol=1e-6)
    assert all(not (torch.is_tensor(item) and item.shape[-1:] == (1,)) for item in as_tuple[1:])  # no probe


@pytest.mark.parametrize("family", list(FAMILIES))
def test_without_labels_or_in_eval_mode_the_model_runs_as_written(family, lce_calls):
    model = _build(family)
    inputs = _batch()
    labels = inputs.pop("labels")
    with torch.no_grad():
        expected_logits = model(**inputs).logits
        model.eval()
        expected_eval = model(**inputs, labels=labels)
        model.train()
        lt.apply(model)
        torch.testing.assert_close(model(**inputs).logits, expected_logits, rtol=0, atol=0)
        model.eval()  # default skip_logits=None: eval mode gives logits and the model's own loss
        actual_eval = model(**inputs, labels=labels)
        assert lce_calls == []
        torch.testing.assert_close(actual_eval.logits, expected_eval.logits, rtol=0, atol=0)
        torch.testing.assert_close(actual_eval.loss, expected_eval.loss, rtol=0, atol=0)
        lean_eval = model(**inputs, labels=labels, skip_logits=True)  # per call, as Liger-Kernel's keyword
        assert lean_eval.logits is None and len(lce_calls) == 1
        torch.testing.assert_close(lean_eval.loss, expected_eval.loss, rtol=1e-5, atol=1e-6)


def test_generate_still_works():
    model = _build("llama")
    prompt = _batch()["input_ids"][:1, :4]
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    lt.apply(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)


def test_revert_applied_and_other_instances(lce_calls):
    model, other = _build("llama"), _build("llama")
    inputs = _batch()
    with lt.applied(model):
        assert lt.is_applied(model) and not lt.is_applied(other)
        assert model(**inputs).logits is None and other(**inputs).logits is not None
    assert not lt.is_applied(model) and "forward" not in model.__dict__
    assert model(**inputs).logits is not None
    lt.apply(model, skip_logits=False)  # inert
    assert model(**inputs).logits is not None
    lt.apply(model)  # again: updates the options, does not wrap twice
    assert model(**inputs).logits is None
    assert lt.revert(model) is model and model(**inputs).logits is not None
    assert lt.revert(model) is model  # not applied: as is
    assert len(lce_calls) == 2


def test_causal_lm_loss_on_an_applied_model(lce_calls):
    model = _build("mixtral")
    inputs = _batch()
    expected = model(**inputs).loss
    lt.apply(model)
    actual = lt.causal_lm_loss(model, inputs["input_ids"], inputs["labels"], attention_mask=inputs["attention_mask"])
    assert len(lce_calls) == 1
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_a_model_the_patch_cannot_serve_is_refused_by_name():
    with pytest.raises(TypeError, match=r"argument 'model' \(Linear\) is not a Hugging Face \*ForCausalLM"):
        lt.apply(torch.nn.Linear(3, 4))
    model = _build("llama")
    model.set_output_embeddings(torch.nn.Sequential(torch.nn.Linear(32, VOCABULARY)))
    with pytest.raises(TypeError, match=r"argument 'model' has an output head of type Sequential"):
        lt.apply(model)
    model = _build("llama")
    model.loss_function = lambda logits, labels, **kwargs: logits.sum()
    with pytest.raises(ValueError, match=r"argument 'model' \(LlamaForCausalLM\) computes its loss with <lambda>"):
        lt.apply(model)
    model = _build("llama")
    with pytest.raises(TypeError, match=r"argument 'skip_logits' must be None, True or False"):
        lt.apply(model, skip_logits="yes")
    lt.apply(model)
    inputs = _batch()
    inputs.pop("labels")
    with pytest.raises(ValueError, match=r"argument 'skip_logits' is True but neither 'labels' nor 'shift_labels'"):
        model(**inputs, skip_logits=True)


def test_an_unknown_transform_of_the_logits_is_refused():
    """A config setting the forward does not apply (or a forward transforming the logits in another way) is caught
    on the probe the first time: never a silently different loss."""
    model = _build("llama")
    model.config.logit_scale = 2.0  # LlamaForCausalLM does not scale its logits
    lt.apply(model)
    with pytest.raises(RuntimeError, match=r"LlamaForCausalLM.forward transforms lm_head's output"):
        model(**_batch())


# Trainer: a tiny in-memory dataset, two optimizer steps of two accumulated micro-batches each.
def _dataset():
    generator = torch.Generator().manual_seed(1)
    rows = []
    for row in range(8):
        input_ids = torch.randint(0, VOCABULARY, (11,), generator=generator)
        labels = input_ids.clone()
        labels[:(row % 4) * 2] = -100  # prompts of different lengths: num_items_in_batch differs from a mean's
        rows.append(dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels))
    return rows


def _trainer(model, tmp_path, **extra):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], max_steps=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, per_device_eval_batch_size=4, logging_steps=1, save_strategy="no",
        use_cpu=True, learning_rate=1e-2, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    data = _dataset()
    return transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, **extra)


def _train(trainer):
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_train_and_evaluate_match_the_unpatched_model(tmp_path, lce_calls):
    base = _build("llama")
    unpatched, patched = copy.deepcopy(base), lt.apply(copy.deepcopy(base))
    expected_trainer, actual_trainer = _trainer(unpatched, tmp_path / "a"), _trainer(patched, tmp_path / "b")
    assert actual_trainer.model_accepts_loss_kwargs  # so the Trainer hands the model num_items_in_batch

    expected_losses = _train(expected_trainer)
    actual_losses = _train(actual_trainer)
    assert len(lce_calls) == 4 and all(torch.is_tensor(call["num_items_in_batch"]) for call in lce_calls)
    assert len(actual_losses) == 2
    torch.testing.assert_close(actual_losses, expected_losses, rtol=1e-5, atol=1e-6)
    for (name, actual), expected in zip(patched.named_parameters(), unpatched.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)

    # evaluate(): by default eval mode runs the model as written (logits for compute_metrics, the model's loss).
    expected_eval = expected_trainer.evaluate()["eval_loss"]
    assert actual_trainer.evaluate()["eval_loss"] == pytest.approx(expected_eval, rel=1e-6)
    assert len(lce_calls) == 4
    # skip_logits=True: a lean eval_loss, the same value.
    lt.apply(patched, skip_logits=True)
    assert actual_trainer.evaluate()["eval_loss"] == pytest.approx(expected_eval, rel=1e-5)
    assert len(lce_calls) == 6


def test_trainer_evaluate_with_compute_metrics_gets_the_logits(tmp_path):
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"seen": 1.0}

    model = lt.apply(_build("llama"))
    metrics = _trainer(model, tmp_path, compute_metrics=compute_metrics).evaluate()
    assert seen == [(8, 11, VOCABULARY)] and metrics["eval_seen"] == 1.0 and metrics["eval_loss"] > 0


def test_from_pretrained_applies(tmp_path):
    _build("qwen2").save_pretrained(tmp_path)
    model = lt.from_pretrained(str(tmp_path), backend="reference")
    assert isinstance(model, transformers.Qwen2ForCausalLM) and lt.is_applied(model)
    assert model.train()(**_batch()).logits is None
