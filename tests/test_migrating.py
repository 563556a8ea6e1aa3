"""The README's "Migrating" section, run: each ```python block of it executes here, on tiny models built from
configs (nothing downloaded), in a namespace holding what its surrounding training code would have (a model, a
batch, training arguments). A block that stops working fails here, so the README's one-line swaps stay true."""
import argparse
import pathlib
import re

import pytest
import torch

import leanops

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    """The ```python blocks of the README's "## Migrating" section, in order."""
    text = README.read_text()
    section = text.split("\n## Migrating\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_three_recipes():
    blocks = _blocks()
    assert len(blocks) == 3
    assert "linear_cross_entropy" in blocks[0] and "lt.apply(model)" in blocks[1] and "patch()" in blocks[2]


def test_plain_pytorch_loop():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    model.norm = torch.nn.LayerNorm(16)  # float32: CollageAdamW gives it torch's AdamW update
    model.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
    hidden = model.norm(torch.randn(12, 16)).to(torch.bfloat16)
    namespace = dict(leanops=leanops, model=model, lm_head=model.lm_head, hidden=hidden,
                     targets=torch.randint(0, 50, (12,)), image_features=torch.randn(6, 8, requires_grad=True),
                     text_features=torch.randn(6, 8, requires_grad=True), logit_scale=model.logit_scale)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    exec(_blocks()[0], namespace)
    assert torch.isfinite(namespace["loss"])
    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter, before[name]), f"{name} was not updated"


def test_hugging_face_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(1)
    train_dataset = [{"input_ids": ids, "labels": ids.clone()}
                     for ids in torch.randint(0, 97, (8, 10), generator=generator)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    namespace = dict(model=model, args=args, train_dataset=train_dataset, transformers=transformers)
    exec(_blocks()[1], namespace)
    history = [entry["loss"] for entry in namespace["trainer"].state.log_history if "loss" in entry]
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    assert leanops.integrations.transformers.is_applied(namespace["model"])


def test_open_clip_training():
    open_clip = pytest.importorskip("open_clip")
    import leanops.integrations.open_clip as lean_open_clip

    args = argparse.Namespace(distill=False, model="ViT-B-32", siglip=False, local_loss=False, gather_with_grad=False,
                              rank=0, world_size=1, horovod=False, coca_caption_loss_weight=2.0,
                              coca_contrastive_loss_weight=1.0, loss_dist_impl=None)
    namespace = dict(open_clip=open_clip, args=args)
    try:
        exec(_blocks()[2], namespace)
        loss = namespace["loss"]
        assert isinstance(loss, leanops.nn.ClipLoss)
        features = torch.nn.functional.normalize(torch.randn(2, 5, 8, dtype=torch.float64), dim=-1)
        expected = open_clip.loss.ClipLoss()(features[0], features[1], 10.0)
        assert torch.allclose(loss(features[0], features[1], 10.0), expected)
    finally:
        lean_open_clip.unpatch()
