from __future__ import annotations

import pytest
import torch
from helpers import tiny_timm
from torch import nn
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

from hf_layer_freeze import LayerFreezer, freezable_units
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


# embeddings="unit" | "merge" | "skip": the units that save no compute.


def _tiny_text(name: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(**text, num_labels=3))
    tied = name == "llama-tied"
    return tf.LlamaForCausalLM(tf.LlamaConfig(**text, num_key_value_heads=2, tie_word_embeddings=tied))


BERT_EMBEDDINGS = [f"bert.embeddings.{n}" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
EMBEDDING_UNITS = {  # (model, granularity): the embedding units, by name
    ("llama", "module"): ["model.embed_tokens"],
    ("llama", "block"): ["model.embed_tokens"],
    ("llama-tied", "module"): [],  # embed_tokens is lm_head's: the head's, never a unit
    ("bert", "module"): [*BERT_EMBEDDINGS, "bert.embeddings.LayerNorm"],
    ("bert", "block"): ["bert.embeddings"],  # BertEmbeddings: three lookups and their LayerNorm
}


@pytest.mark.parametrize(("name", "granularity"), list(EMBEDDING_UNITS))
def test_embedding_units_are_kept_merged_into_the_next_unit_or_left_out(name, granularity):
    from hf_layer_freeze.units import is_embedding_unit

    model = _tiny_text(name)
    units = freezable_units(model, granularity)
    embedding = [u for u in units if is_embedding_unit(u, model)]
    assert [u.name for u in embedding] == EMBEDDING_UNITS[name, granularity]
    assert units[: len(embedding)] == embedding  # here they come first
    rest = units[len(embedding) :]
    merged = freezable_units(model, granularity, embeddings="merge")
    skipped = freezable_units(model, granularity, embeddings="skip")
    assert [u.name for u in merged] == [u.name for u in skipped] == [u.name for u in rest]
    # merged: the first unit that is no embedding holds the embeddings' parameters, theirs first; the rest unchanged
    assert merged[0].parameter_names == tuple(n for u in [*embedding, rest[0]] for n in u.parameter_names)
    assert merged[0].module is rest[0].module
    assert [u.parameter_names for u in merged[1:]] == [u.parameter_names for u in rest[1:]]
    # skipped: the embeddings' parameters are in no unit (they train, never frozen); the rest unchanged
    assert [u.parameter_names for u in skipped] == [u.parameter_names for u in rest]
    if embedding:
        _partition_ok(model, merged)


# (model, granularity, embeddings, fraction frozen from the first step): the modules frozen, by name prefix
FROZEN_FROM_THE_FIRST_STEP = {
    ("llama", "block", "unit", 0.25): ["model.embed_tokens"],  # 1 of 4 units: a lookup, no compute saved
    ("llama", "block", "merge", 0.25): [],  # floor(0.25 * 3): embed_tokens waits for layers.0
    ("llama", "block", "skip", 0.25): [],
    ("llama", "block", "unit", 0.5): ["model.embed_tokens", "model.layers.0."],
    ("llama", "block", "merge", 0.5): ["model.embed_tokens", "model.layers.0."],
    ("llama", "block", "skip", 0.5): ["model.layers.0."],  # embed_tokens trains
    ("llama", "block", "skip", 1.0): ["model.layers.", "model.norm"],
    ("bert", "block", "unit", 0.25): ["bert.embeddings."],
    ("bert", "block", "merge", 0.5): ["bert.embeddings.", "bert.encoder.layer.0."],
    ("bert", "block", "skip", 1.0): ["bert.encoder.", "bert.pooler."],
    ("llama", "module", "unit", 0.1): ["model.embed_tokens", "model.layers.0.self_attn.q_proj"],  # 2 of 20
    ("llama", "module", "merge", 0.1): ["model.embed_tokens", "model.layers.0.self_attn.q_proj"],  # 1 of 19
    ("llama", "module", "skip", 0.1): ["model.layers.0.self_attn.q_proj"],  # 1 of 19
    ("bert", "module", "unit", 0.2): ["bert.embeddings."],  # 4 of 21: the four embedding units, no compute saved
    ("bert", "module", "merge", 0.2): [  # 3 of 17
        "bert.embeddings.",
        *(f"bert.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")),
    ],
}


@pytest.mark.parametrize(("name", "granularity", "embeddings", "fraction"), list(FROZEN_FROM_THE_FIRST_STEP))
def test_what_a_fraction_freezes_with_each_embeddings_choice_the_head_never(name, granularity, embeddings, fraction):
    model = _tiny_text(name)
    freezer = LayerFreezer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), granularity=granularity, embeddings=embeddings,
        freeze_start=0.0, freeze_start_level=fraction, freeze_level=fraction,
    )  # fmt: skip
    freezer.update(0.0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # the ground truth, not the record
    prefixes = FROZEN_FROM_THE_FIRST_STEP[name, granularity, embeddings, fraction]
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(tuple(prefixes))}
    head = model.lm_head if name.startswith("llama") else model.classifier
    assert all(p.requires_grad for p in head.parameters())


def test_budgets_weigh_embeddings_as_the_choice_says():
    """A tiny Llama by module: `embed_tokens` holds 1024 of the units' 6224 parameters (16%) and no forward FLOP."""
    model = _tiny_text("llama")
    batch = torch.zeros(2, 8, dtype=torch.long)
    frozen = {}
    for budget in ("params", "flops"):
        for embeddings in ("unit", "merge", "skip"):
            freezer = LayerFreezer(
                model, torch.optim.SGD(model.parameters(), lr=0.1), budget=budget, embeddings=embeddings,
                freeze_start=0.5,
            )  # fmt: skip
            freezer.profile_with(batch)
            assert freezer.num_units_at(0.5) == 0  # nothing before freeze_start, not even a unit weighing 0
            fraction = 0.2 if budget == "params" else 0.01
            frozen[budget, embeddings] = [u.name for u in freezer.units[: freezer.num_units_at(0.5 + fraction / 2)]]
            freezer.close()
    layer0 = [f"model.layers.0.self_attn.{n}_proj" for n in "qkvo"]
    assert sum(p.numel() for p in model.model.embed_tokens.parameters()) == 1024
    # params, 20%: the embedding alone (1024 <= 1244.8 < 1280), nothing (the merged first unit weighs 1280) or
    # layer 0's attention (1024 of the 5200 without it)
    assert frozen["params", "unit"] == ["model.embed_tokens"]
    assert frozen["params", "merge"] == []
    assert frozen["params", "skip"] == layer0
    # flops, 1%: the embedding weighs 0, so it freezes with any fraction above 0; merged, it weighs q_proj's FLOPs
    assert frozen["flops", "unit"] == ["model.embed_tokens"]
    assert frozen["flops", "merge"] == frozen["flops", "skip"] == []


def test_patch_and_stem_convolutions_are_no_embedding_units():
    """They cost FLOPs: a ViT's patch embedding, a ResNet's stem; nor is a ViT's cls_token / pos_embed (no lookup)."""
    for model in (tiny_timm("vit_tiny_patch16_224"), tiny_timm("resnet10t")):
        for granularity in ("module", "block"):
            units = [u.name for u in freezable_units(model, granularity)]
            assert [u.name for u in freezable_units(model, granularity, embeddings="skip")] == units


@pytest.mark.parametrize("cache_activations", [False, True])
def test_skipped_embeddings_train_at_every_step_below_a_frozen_prefix(cache_activations):
    """embeddings="skip" with layer 0 of a tiny Llama frozen from the first step: the backward still runs down to
    `embed_tokens`, which changes at every step, also with activation caching on over repeated batches (it cannot
    serve a prefix whose embeddings train); layer 0 stays bitwise as given."""
    model = _tiny_text("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    freezer = LayerFreezer(
        model, optimizer, granularity="block", embeddings="skip", freeze_start=0.0, freeze_start_level=0.5,
        freeze_level=0.5, cache_activations=cache_activations,
    )  # fmt: skip
    freezer.update(0.0)
    layer0 = [p.detach().clone() for p in model.model.layers[0].parameters()]
    batches = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for step in range(6):  # three epochs over the same two batches
        ids = batches[step % 2]
        before = model.model.embed_tokens.weight.detach().clone()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert not torch.equal(before, model.model.embed_tokens.weight), step
    assert all(torch.equal(a, b) for a, b in zip(layer0, model.model.layers[0].parameters(), strict=True))
    assert model.model.embed_tokens.weight.requires_grad and freezer.frozen_units == 1
