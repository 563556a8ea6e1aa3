"""leanops.integrations.transformers.causal_lm_loss: a Hugging Face causal LM's loss from its hidden states and
lm_head weight, without logits, equals the model's own loss (value and every parameter's gradient) on tiny randomly
initialised Llama, Gemma 2 and Mixtral configurations (nothing downloaded). apply(model), the patch of the model's
own forward, is tested in test_transformers_patch.py."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import provider_cases, slow_when_interpreted  # noqa: E402
from leanops.integrations.transformers import causal_lm_loss  # noqa: E402
from leanops.ops import CROSS_ENTROPY  # noqa: E402

VOCABULARY = 97


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _gemma2():
    config = transformers.Gemma2Config(vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, max_position_embeddings=64, final_logit_softcapping=3.0,
                                       attn_implementation="eager")
    return transformers.Gemma2ForCausalLM(config)


def _mixtral():
    config = transformers.MixtralConfig(vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                                        output_router_logits=True, router_aux_loss_coef=0.1)
    return transformers.MixtralForCausalLM(config)


def _batch(device):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCABULARY, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # a padded sequence
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :3] = -100  # a prompt the loss skips
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def _grads(model):
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


# The integration is the same Python for every provider: under Triton's interpreter it is slow.
@pytest.mark.parametrize("backend,device", slow_when_interpreted(provider_cases(CROSS_ENTROPY)))
@pytest.mark.parametrize("build", [_llama, _gemma2], ids=["llama", "gemma2"])
@pytest.mark.parametrize("num_items_in_batch", [None, 17], ids=["mean", "num_items"])
def test_loss_and_gradients_equal_the_models_own(backend, device, build, num_items_in_batch):
    torch.manual_seed(0)
    model = build().to(device)
    input_ids, attention_mask, labels = _batch(device)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}

    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra).loss
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    actual = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask, backend=backend, **extra)
    actual.backward()
    actual_grads = _grads(model)

    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in actual_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shift_labels_and_bad_arguments():
    torch.manual_seed(0)
    model = _llama()
    input_ids, attention_mask, labels = _batch("cpu")
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    by_labels = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask)
    by_shift = causal_lm_loss(model, input_ids, shift_labels=shifted, attention_mask=attention_mask)
    assert torch.equal(by_labels, by_shift)
    with pytest.raises(ValueError, match=r"exactly one of the arguments 'labels' and 'shift_labels'"):
        causal_lm_loss(model, input_ids)


def test_errors_name_labels_not_targets():
    model = _llama()
    input_ids, attention_mask, labels = _batch("cpu")
    bad = labels.clone()
    bad[0, 5] = VOCABULARY + 3
    with pytest.raises(ValueError, match=r"argument 'labels' holds token ids outside \[0, 97\)"):
        causal_lm_loss(model, input_ids, bad, attention_mask=attention_mask)
    with pytest.raises(TypeError, match=r"argument 'labels' must be an int64 tensor"):
        causal_lm_loss(model, input_ids, labels.float(), attention_mask=attention_mask)
    with pytest.raises(ValueError, match=r"argument 'shift_labels' must have shape \(3, 11\)"):
        causal_lm_loss(model, input_ids, shift_labels=labels[:, :5], attention_mask=attention_mask)


def test_a_model_that_is_not_a_causal_lm_is_refused_by_name():
    with pytest.raises(TypeError, match=r"argument 'model' \(Linear\) is not a Hugging Face \*ForCausalLM"):
        causal_lm_loss(torch.nn.Linear(3, 4), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2,
                                                                                                dtype=torch.int64))


def test_every_label_ignored_gives_the_models_nan():
    """The model's own mean over no labels is 0 / 0 = NaN; so is this (not a silent 0)."""
    torch.manual_seed(0)
    model = _llama()
    input_ids, attention_mask, labels = _batch("cpu")
    ignored = torch.full_like(labels, -100)
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=ignored).loss
    actual = causal_lm_loss(model, input_ids, ignored, attention_mask=attention_mask)
    assert torch.isnan(expected) and torch.isnan(actual)


def test_mixtral_router_auxiliary_loss_is_in_the_loss():
    """Mixtral adds router_aux_loss_coef * its load-balancing loss to .loss when output_router_logits: so does
    causal_lm_loss (the model's own forward runs, only the logits are left out)."""
    torch.manual_seed(0)
    model = _mixtral()
    input_ids, attention_mask, labels = _batch("cpu")
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected.loss.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    actual = causal_lm_loss(model, input_ids, labels, attention_mask=attention_mask)
    actual.backward()
    assert expected.aux_loss > 0
    torch.testing.assert_close(actual, expected.loss, rtol=1e-5, atol=1e-6)
    actual_grads = _grads(model)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in actual_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
