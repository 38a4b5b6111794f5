"""The head, wherever the model sits: the `head` option, PEFT, timm, transformers, a user's module around a
backbone, and a warning naming the unit taken as head when no rule applies."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from helpers import tiny_timm
from torch import nn

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback, find_head, freezable_units

BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _unit_param_ids(units) -> set[int]:
    return {id(p) for unit in units for p in unit.parameters}


def test_a_users_mlp_head_around_a_bert_model_is_head():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = tf.BertModel(tf.BertConfig(**BERT))
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))

        def forward(self, input_ids):
            return self.mlp(self.encoder(input_ids).last_hidden_state[:, 0])

    torch.manual_seed(0)
    model = Classifier()
    head = find_head(model)
    assert head.rule == "outside the backbone"
    assert head.parameter_ids == {id(p) for p in model.mlp.parameters()}
    units = freezable_units(model)
    assert not _unit_param_ids(units) & head.parameter_ids  # not even the MLP's first layer
    assert _unit_param_ids(units) == {id(p) for p in model.encoder.parameters()}  # the whole backbone, pooler too


def test_a_masked_lm_inside_a_plain_wrapper_keeps_its_prediction_head_and_tied_embedding():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tf.BertForMaskedLM(tf.BertConfig(**BERT))

    torch.manual_seed(0)
    model = Wrapper()
    embedding = model.lm.bert.embeddings.word_embeddings.weight
    assert model.lm.cls.predictions.decoder.weight is embedding  # tied
    in_units = _unit_param_ids(freezable_units(model))
    assert id(embedding) not in in_units
    assert not in_units & {id(p) for p in model.lm.cls.parameters()}
    assert in_units == _unit_param_ids(freezable_units(model.lm))  # the same units as the bare model's


def test_the_head_option_names_the_head_and_survives_the_callback_state():
    model = tiny_timm("resnet10t")
    units = freezable_units(model, head=["layer4", "fc"])
    assert not [u.name for u in units if u.name.startswith(("layer4", "fc"))]
    assert units[-1].name.startswith("layer3")
    callback = LayerFreezingCallback(head="fc")
    assert callback.state()["args"]["head"] == ["fc"]  # JSON-safe
    assert LayerFreezingCallback(**callback.state()["args"]).options == callback.options


@pytest.mark.parametrize("head", ["not_a_module", ["fc", "layer9"], [], 3])
def test_a_bad_head_option_is_a_one_line_value_error(head):
    model = tiny_timm("resnet10t")
    with pytest.raises(ValueError, match="^head must") as error:
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), head=head)
    assert "\n" not in str(error.value)


def test_peft_lora_on_a_causal_lm_finds_its_head_without_a_warning_and_freezes_only_adapters():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = tf.LlamaConfig(**BERT, num_key_value_heads=2)
    model = peft.get_peft_model(tf.LlamaForCausalLM(config), peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the lm_head is the head (PEFT froze it): no guess, no warning
        units = freezable_units(model)
    assert find_head(model).rule == "transformers base_model"
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(n for unit in units for n in unit.parameter_names) == sorted(lora)
    assert len(units) == len(lora) // 2  # one unit per adapted module: its A and B matrices together
