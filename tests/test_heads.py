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


T5 = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2)
BART = dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)  # fmt: skip
VIT = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=32)  # fmt: skip


def _seq2seq(kind: str) -> tuple[nn.Module, str, dict[str, torch.Tensor]]:
    """A tiny seq2seq model, the name of the module that is its head, and the inputs of one training step."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, 64, (2, 6), generator=generator)}
    labels = torch.randint(3, 64, (2, 5), generator=generator)
    decoder_input_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), labels[:, :-1]], dim=1)  # teacher forcing
    if kind.startswith("t5"):
        model, head = tf.T5ForConditionalGeneration(tf.T5Config(**T5)), "lm_head"
        if kind == "t5-untied":  # a T5 v1.1 checkpoint: lm_head is not the shared embedding
            model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())
    elif kind == "bart":
        model, head = tf.BartForConditionalGeneration(tf.BartConfig(**BART)), "lm_head"
    else:
        decoder = tf.BertConfig(**BERT, is_decoder=True, add_cross_attention=True)
        if kind == "encoder-decoder":
            config = tf.EncoderDecoderConfig.from_encoder_decoder_configs(tf.BertConfig(**BERT), decoder)
            model = tf.EncoderDecoderModel(config=config)
        else:
            config = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(tf.ViTConfig(**VIT), decoder)
            model = tf.VisionEncoderDecoderModel(config=config)
            inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
        head = "decoder.cls"  # BertLMHeadModel's whole prediction head: transform, projection, bias
    return model, head, {**inputs, "decoder_input_ids": decoder_input_ids, "labels": labels}


@pytest.mark.parametrize("kind", ["t5", "t5-untied", "bart", "encoder-decoder", "vision-encoder-decoder"])
def test_a_seq2seq_output_projection_is_head_and_trains_after_a_full_freeze(kind):
    model, head_name, inputs = _seq2seq(kind)
    head = model.get_submodule(head_name)
    head_params = dict(head.named_parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not [w for w in caught if "No rule names the head" in str(w.message)], "a guessed head, and named wrong"
    in_units = _unit_param_ids(freezer.units)
    assert not in_units & {id(p) for p in head_params.values()}, "the output projection, or what is tied to it"
    output = model.get_output_embeddings().weight
    tied = [
        n for n, p in model.named_parameters(remove_duplicate=False) if p is output and not n.startswith(head_name)
    ]
    assert bool(tied) == (kind != "t5-untied")  # the input embedding it is tied to (same Parameter)
    if kind == "t5-untied":
        assert freezer.units[0].name == "shared"  # an input embedding of its own: the first unit
    names = [u.name for u in freezer.units]
    encoder = max(i for i, n in enumerate(names) if n.startswith(("encoder.", "model.encoder.")))
    decoder = min(i for i, n in enumerate(names) if n.startswith(("decoder.", "model.decoder.")))
    assert encoder < decoder, "encoder layers freeze before decoder layers"

    freezer.freeze_units(freezer.num_units)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(**inputs).loss.backward()
    freezer.optimizer.step()
    after = dict(model.named_parameters())
    for name in before:
        in_head = id(after[name]) in {id(p) for p in head_params.values()}
        assert after[name].requires_grad == in_head, name
        assert torch.equal(before[name], after[name]) != in_head, f"{name}: the head trains, the frozen never"


def test_with_no_rule_the_last_module_is_head_with_the_embedding_tied_to_it():
    """A user's language model: its output projection shares the input embedding's weight and has no bias of its own.
    The guess names the projection, and the embedding's weight, the projection's too, never freezes."""

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 16)
            self.blocks = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16))
            self.out = nn.Linear(16, 64, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(self.blocks(self.embed(ids)))

    torch.manual_seed(0)
    model = TinyLM()
    with pytest.warns(UserWarning, match="No rule names the head") as caught:
        freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "'out'" in str(caught[0].message), "the guess names the output projection"
    assert [u.name for u in freezer.units] == ["blocks.0", "blocks.2", "blocks.3"]
    freezer.freeze_units(freezer.num_units)
    before = model.embed.weight.detach().clone()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    freezer.optimizer.step()
    assert model.out.weight.requires_grad and not torch.equal(before, model.out.weight)


def test_peft_lora_on_t5_finds_its_head_without_a_warning_and_every_adapter_is_a_unit():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(**T5))
    # no task_type: PEFT 0.21's PeftModelForSeq2SeqLM reads a generation method transformers 5 no longer has
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False)
    )  # B random: A trains at step one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the lm_head is the head (PEFT froze it): no guess, no warning
        freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(n for unit in freezer.units for n in unit.parameter_names) == sorted(lora)
    freezer.freeze_units(freezer.num_units // 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, _, inputs = _seq2seq("t5")
    model(**inputs).loss.backward()
    freezer.optimizer.step()
    frozen = {n for unit in freezer.units[: freezer.frozen_units] for n in unit.parameter_names}
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == (name in lora and name not in frozen), name
