from __future__ import annotations

import pytest
import torch
from helpers import tiny_timm
from torch import nn
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

from hf_layer_freeze import freezable_units
from hf_layer_freeze.heads import classifier_modules

TIMM_FAMILIES = ["resnet10t", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"]


def _partition_ok(model: nn.Module, units) -> None:
    head_ids = {id(p) for head in classifier_modules(model) for p in head.parameters()}
    unit_ids = [id(p) for unit in units for p in unit.parameters]
    assert len(unit_ids) == len(set(unit_ids)), "a parameter is in two units"
    assert not set(unit_ids) & head_ids, "a head parameter is freezable"
    assert set(unit_ids) | head_ids == {id(p) for p in model.parameters()}, (
        "a parameter is in no unit and not the head"
    )


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_units_exclude_the_head_and_cover_every_other_parameter(name):
    model = tiny_timm(name)
    units = freezable_units(model)
    head = model.get_classifier()
    assert classifier_modules(model) == [head]
    assert all(unit.module is not head for unit in units)
    _partition_ok(model, units)
    # depth-first pre-order of the ownership tree
    order = [n for n, _ in model.named_modules()]
    positions = [order.index(unit.name) for unit in units]
    assert positions == sorted(positions)


def test_vit_root_parameters_are_freezable_and_come_first():
    model = tiny_timm("vit_tiny_patch16_224")
    units = freezable_units(model)
    assert units[0].name == ""
    assert set(units[0].parameter_names) == {"cls_token", "pos_embed"}
    assert units[1].name == "patch_embed.proj"


def test_head_module_with_norm_only_excludes_the_classifier():
    model = tiny_timm("convnext_atto")  # head = norm + fc; get_classifier() is head.fc
    names = [unit.name for unit in freezable_units(model)]
    assert "head.norm" in names and "head.fc" not in names


def test_head_is_found_inside_transformers_timm_wrapper():
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=10))
    units = freezable_units(model)
    assert classifier_modules(model) == [model.timm_model.get_classifier()]
    assert units[0].name == "timm_model.conv1.0"
    assert len(units) == len(freezable_units(model.timm_model))
    _partition_ok(model, units)


def test_plain_module_excludes_its_last_unit_and_says_so_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 8, 8))
    with pytest.warns(
        UserWarning, match="No rule names the head of Sequential.*its last module owning trainable parameters, '4'"
    ):
        names = [unit.name for unit in freezable_units(model)]
    assert names == ["0", "1"]


def test_headless_timm_backbone_inside_a_user_module_keeps_the_users_head_and_freezes_the_whole_backbone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = tiny_timm("resnet10t", num_classes=0)  # get_classifier() is nn.Identity
            self.classifier = nn.Linear(512, 3)

    net = Net()
    names = [unit.name for unit in freezable_units(net)]
    assert names == [f"backbone.{unit.name}" for unit in freezable_units(net.backbone)]  # its last unit included
    assert "classifier" not in names


def test_shared_parameter_belongs_to_the_first_unit():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.head = nn.Linear(4, 2)

    units = freezable_units(Tied())
    assert [unit.parameter_names for unit in units] == [("a.weight", "a.bias"), ("b.bias",)]


def test_wrapped_models_give_the_same_units():
    model = tiny_timm("resnet10t")
    compiled = torch.compile(model, backend="eager")
    assert [u.name for u in freezable_units(compiled)] == [u.name for u in freezable_units(model)]


def test_non_module_is_a_value_error():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        freezable_units("resnet")


def _tiny_transformers_models():
    """Tiny transformers models whose heads are more than one module, or tied to the input embedding."""
    import transformers as tf

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    vit = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, num_labels=3)  # fmt: skip
    return {
        "roberta": tf.RobertaForSequenceClassification(tf.RobertaConfig(**text, num_labels=3)),
        "deit-distilled": tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**vit)),
        "swiftformer": tf.SwiftFormerForImageClassification(
            tf.SwiftFormerConfig(depths=[1, 1, 1, 1], embed_dims=[8, 8, 16, 16], num_labels=3)
        ),
        "levit": tf.LevitForImageClassificationWithTeacher(
            tf.LevitConfig(
                image_size=32,
                hidden_sizes=[16, 32, 48],
                num_attention_heads=[1, 2, 3],
                depths=[1, 1, 1],
                key_dim=[8, 8, 8],
                num_labels=3,
            )  # fmt: skip
        ),
        "llama-tied": tf.LlamaForCausalLM(tf.LlamaConfig(**text, num_key_value_heads=2, tie_word_embeddings=True)),
        "llama-untied": tf.LlamaForCausalLM(tf.LlamaConfig(**text, num_key_value_heads=2, tie_word_embeddings=False)),
    }


@pytest.mark.parametrize("name", list(_tiny_transformers_models()))
def test_transformers_heads_are_everything_outside_the_base_model(name):
    model = _tiny_transformers_models()[name]
    base = model.base_model
    outside = {id(p) for child in model.children() if child is not base for p in child.parameters()}
    assert outside, "the model has a head outside its base model"
    units = freezable_units(model)
    in_units = {id(p) for unit in units for p in unit.parameters}
    assert not in_units & outside, "a head parameter (or one shared with the head) is freezable"
    # every parameter of the base model that the head does not share is freezable
    assert in_units == {id(p) for p in base.parameters()} - outside
    if name == "llama-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert "model.embed_tokens" not in [unit.name for unit in units]


def test_a_timm_model_without_head_keeps_its_last_unit():
    # what `plan --num-classes 0` builds: no classifier, so no unit stands in for one
    headless = freezable_units(tiny_timm("resnet10t", num_classes=0))
    with_head = freezable_units(tiny_timm("resnet10t", num_classes=10))
    assert [u.name for u in headless] == [u.name for u in with_head]


def test_block_granularity_sees_the_timm_model_inside_a_peft_model():
    peft = pytest.importorskip("peft")
    model = tiny_timm("vit_tiny_patch16_224", num_classes=3)
    with_qkv = [u.name for u in freezable_units(model, "block") if any(".qkv." in n for n in u.parameter_names)]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"]))
    units = freezable_units(lora, "block")
    # one unit per group of the bare model's group_matcher() that holds a block (the last one holds the final norm
    # too, so it is named by the root), each with that block's adapters (the stem and norms are frozen by PEFT)
    assert [u.name for u in units] == [f"base_model.model.{n}".rstrip(".") for n in with_qkv]
    assert len(units) == len(model.blocks)
    assert all(len(u.parameters) == 2 for u in units)
