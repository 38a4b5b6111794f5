"""Beyond the method card: execution order, block granularity, parameter/FLOP budgets, frozen BatchNorm."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch
from helpers import tiny_timm, train_steps
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hf_layer_freeze import FreezeOptions, LayerFreezer, LayerFreezingCallback, freezable_units
from hf_layer_freeze.options import (
    CallbackOptions,
    CallbackOptionsKwargs,
    FreezeOptionsKwargs,
    add_option_arguments,
    document_options,
    option,
)
from hf_layer_freeze.schedule import num_units_for_budget


class DefinedBackwards(nn.Module):
    """Defines `late` before `early`, but runs `early` first: definition order is not execution order."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(8, 8, 3, padding=1)
        self.early = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.late(torch.relu(self.early(x))).mean((2, 3)))


def _step_flops(model, optimizer, x, y) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    optimizer.zero_grad()
    return counter.get_total_flops()


def test_execution_order_freezes_the_true_prefix_and_saves_backward_flops():
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    flops = {}
    for order in ("definition", "execution"):
        torch.manual_seed(0)
        model = DefinedBackwards()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = LayerFreezer(model, optimizer, freeze_start=0.0, order=order)
        assert [u.name for u in freezer.units] == ["late", "early"]  # before any forward
        _step_flops(model, optimizer, x, y)  # the first training forward records the order
        freezer.update(0.5)  # one unit of two
        frozen = [u.name for u in freezer.units[: freezer.frozen_units]]
        assert frozen == (["late"] if order == "definition" else ["early"])
        flops[order] = _step_flops(model, optimizer, x, y)
    assert flops["execution"] < flops["definition"]


def test_execution_order_is_recorded_without_touching_batchnorm_statistics():
    model = tiny_timm("resnet10t")
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), order="execution")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        freezer.profile_with(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and freezer.profiled
    assert freezer.units[0].name == "conv1.0"


def test_block_granularity_never_half_freezes_a_block():
    model = tiny_timm("resnet10t")
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block")
    assert [u.name for u in freezer.units] == ["", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert freezer.units[0].parameter_names[0] == "conv1.0.weight"  # the stem: conv1.* and bn1
    freezer.update(0.75)
    assert freezer.frozen_units == 2
    for block in ("layer1.0", "layer2.0"):
        states = {p.requires_grad for n, p in model.named_parameters() if n.startswith(block)}
        assert states == ({False} if block == "layer1.0" else {True})


def test_block_granularity_needs_a_group_matcher():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(
        ValueError, match="granularity='block' needs a timm model with group_matcher.*_no_split_modules"
    ):
        freezable_units(model, granularity="block")


def _tiny_transformers(name: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    if name == "vit":
        config = tf.ViTConfig(image_size=32, patch_size=8, **{k: v for k, v in text.items() if k != "vocab_size"})
        return tf.ViTForImageClassification(config)
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(**text, num_labels=3))
    return tf.LlamaForCausalLM(tf.LlamaConfig(**text, num_key_value_heads=2, tie_word_embeddings=False))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit", ["vit.embeddings", "vit.encoder.layer.0", "vit.encoder.layer.1", "vit.encoder.layer.2",
                 "vit.layernorm"]),
        ("bert", ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2",
                  "bert.pooler.dense"]),
        ("llama", ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm"]),
    ],
)  # fmt: skip
def test_block_granularity_freezes_whole_transformers_layers(name, expected):
    model = _tiny_transformers(name)
    units = freezable_units(model, granularity="block")
    layer_names = [u.name for u in units]
    if name == "vit" and "vit.layers.0" in layer_names:  # transformers 5 names ViT's layers `layers`
        expected = [n.replace("encoder.layer.", "layers.") for n in expected]
    assert layer_names == expected
    # every non-head parameter is in exactly one unit; each layer's parameters all in its unit
    modules = freezable_units(model)
    assert {id(p) for u in units for p in u.parameters} == {id(p) for u in modules for p in u.parameters}
    layer = dict(model.named_modules())[expected[1]]
    assert set(units[1].parameters) == set(layer.parameters())
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block")
    freezer.freeze_units(2)
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(p.requires_grad for p in dict(model.named_modules())[expected[2]].parameters())


def test_budgets_count_parameters_and_flops_not_units():
    model = tiny_timm("resnet18")
    x = torch.randn(2, 3, 64, 64)
    counts = {}
    for budget in ("units", "params", "flops"):
        freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), budget=budget)
        freezer.profile_with(x)
        counts[budget] = freezer.num_units_at(0.75)  # fraction 0.5
        if budget == "units":
            continue
        weights = [u.numel for u in freezer.units] if budget == "params" else list(freezer.profile.forward_flops)
        k = counts[budget]
        assert sum(weights[:k]) <= 0.5 * sum(weights) < sum(weights[: k + 1])
    assert counts["units"] == 20
    # resnet18's early units hold few parameters but much compute
    assert counts["params"] > counts["units"] > counts["flops"]


def test_num_units_for_budget():
    assert num_units_for_budget(0.5, [10, 10, 60, 20]) == 2
    assert num_units_for_budget(1.0, [1, 2, 3]) == 3
    assert num_units_for_budget(0.0, [0, 5]) == 1  # a zero-weight prefix costs nothing
    assert num_units_for_budget(0.5, [0, 0, 0, 0]) == 2


def test_frozen_batchnorm_statistics_stay_bitwise_unchanged_through_train_mode():
    for freeze_batchnorm in (False, True):
        model = tiny_timm("resnet10t")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        freezer = LayerFreezer(model, optimizer, freeze_start=0.0, freeze_batchnorm=freeze_batchnorm)
        train_steps(model, optimizer, steps=1)
        freezer.update(0.5)
        bn = model.conv1[1]  # in the frozen prefix
        assert not bn.weight.requires_grad
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        for step in range(3):
            model.train()  # as the Trainer does every step
            train_steps(model, optimizer, steps=1, seed=step + 1)
        unchanged = all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
        assert unchanged == freeze_batchnorm
        assert model.layer4[0].bn1.training  # trainable BatchNorm layers still train


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": "forward"}, r"order must be one of \('definition', 'execution'\), got 'forward'"),
        ({"granularity": "stage"}, r"granularity must be one of \('module', 'block'\), got 'stage'"),
        ({"budget": "time"}, r"budget must be one of \('units', 'params', 'flops'\), got 'time'"),
        ({"freeze_batchnorm": "yes"}, r"freeze_batchnorm must be True or False, got 'yes'"),
        ({"embeddings": "drop"}, r"embeddings must be one of \('unit', 'merge', 'skip'\), got 'drop'"),
        ({"freeze_start_level": 1.5}, r"freeze_start_level must be a number in \[0, 1\], got 1.5"),
        (
            {"freeze_start_level": 0.75, "freeze_level": 0.5},
            r"^freeze_start_level must be at most freeze_level .*, got freeze_start_level=0.75 and freeze_level=0.5$",
        ),
    ],
)
def test_option_values_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerFreezingCallback(**kwargs)
    model = tiny_timm()
    with pytest.raises(ValueError, match=match):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_flops_budget_resumed_before_the_first_forward_profiles_on_it():
    model = tiny_timm("resnet10t")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = LayerFreezer(model, optimizer, budget="flops")
    with pytest.raises(RuntimeError, match="budget='flops' cannot count units before the first forward pass"):
        freezer.update(0.9)
    freezer.freeze_units(5)  # what a resume re-applies from the saved count
    train_steps(model, optimizer, steps=1)  # the first training forward profiles the units
    assert freezer.profiled and freezer.frozen_units == 5
    assert freezer.num_units_at(0.9) > 5


# Options once: one definition per option in options.py, which the constructors, their docstrings and plan's flags
# are derived from.


@pytest.mark.parametrize(
    ("options", "kwargs"), [(FreezeOptions, FreezeOptionsKwargs), (CallbackOptions, CallbackOptionsKwargs)]
)
def test_the_kwargs_typeddict_lists_exactly_the_options(options, kwargs):
    # The TypedDict is the one repetition typing needs: this keeps it from drifting.
    assert list(typing.get_type_hints(kwargs)) == [f.name for f in dataclasses.fields(options)]
    assert kwargs.__required_keys__ == frozenset()


def test_callback_options_are_the_freezers_and_two_more():
    names = [f.name for f in dataclasses.fields(CallbackOptions)]
    assert names == [f.name for f in dataclasses.fields(FreezeOptions)] + ["freeze_every", "keep_frozen"]
    defaults = CallbackOptions()
    assert defaults.freeze_options() == FreezeOptions()
    assert (defaults.freeze_every, defaults.keep_frozen) == ("auto", False)


def test_an_unknown_keyword_is_a_one_line_type_error_naming_it_and_the_options():
    model = tiny_timm()
    with pytest.raises(TypeError) as freezer_error:
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freez_start=0.1)
    with pytest.raises(TypeError) as callback_error:
        LayerFreezingCallback(freeze_start=0.1, keep_frozn=True, cache=True)
    freezer_message, callback_message = str(freezer_error.value), str(callback_error.value)
    assert "\n" not in freezer_message and "\n" not in callback_message
    assert freezer_message.startswith("unexpected keyword argument 'freez_start'; the options are freeze_start, ")
    names = [f.name for f in dataclasses.fields(FreezeOptions)]  # every option, whichever was added last
    assert freezer_message.endswith(", ".join(names)) and "keep_frozen" not in freezer_message
    assert callback_message.startswith("unexpected keyword arguments 'keep_frozn', 'cache'; the options are ")
    assert callback_message.endswith(", ".join(f.name for f in dataclasses.fields(CallbackOptions)))
    assert callback_message.endswith(", ".join([*names, "freeze_every", "keep_frozen"]))
    with pytest.raises(TypeError, match="unexpected keyword argument 'freeze_every'"):
        FreezeOptions.from_kwargs(freeze_every="step")  # the callback's, not the freezer's


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"freeze_every": "never"}, r"freeze_every must be one of \('auto', 'epoch', 'step'\), got 'never'"),
        ({"keep_frozen": 1}, r"keep_frozen must be True or False, got 1"),
        ({"freeze_start": 1.0}, r"freeze_start must be a number in \[0, 1\), got 1.0"),
        ({"head": []}, r"head must be None, a module name or a non-empty list of module names"),
        ({"cache_max_bytes": 0}, r"cache_max_bytes must be an integer >= 1 \(bytes of host memory\), got 0"),
    ],
)
def test_callback_options_keep_their_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerFreezingCallback(**kwargs)


def test_the_callbacks_state_rebuilds_it_and_is_json_safe():
    callback = LayerFreezingCallback(freeze_start=0.25, head="fc", freeze_every="step", keep_frozen=True)
    args = callback.state()["args"]
    assert json.loads(json.dumps(args)) == args == CallbackOptions(**args).to_dict()
    assert args["head"] == ["fc"]
    rebuilt = LayerFreezingCallback(**args)  # what the Trainer does with restore_callback_states_from_checkpoint
    assert rebuilt.options == callback.options and rebuilt.state() == callback.state()
    assert (rebuilt.freeze_every, rebuilt.keep_frozen) == ("step", True)


@pytest.mark.parametrize(("cls", "options"), [(LayerFreezer, FreezeOptions), (LayerFreezingCallback, CallbackOptions)])
def test_help_documents_every_option_from_its_definition(cls, options):
    doc = cls.__doc__
    args = doc[doc.index("    Args:\n") : doc.index("    Example:\n")]
    for each in dataclasses.fields(options):
        assert f"\n        {each.name} (`" in args, each.name
        assert each.metadata["doc"].split()[-1] in args  # its text, re-wrapped
    assert "max_freeze_events (`int`, *optional*):" in args
    assert 'order (`str`, *optional*, defaults to `"definition"`):' in args
    assert "freeze_batchnorm (`bool`, *optional*, defaults to `False`):" in args
    assert "cache_max_bytes (`int`, *optional*, defaults to 4 GiB):" in args
    assert "head (`str` or `list[str]`, *optional*):" in args
    assert all(len(line) <= 119 for line in doc.splitlines())
    if cls is LayerFreezer:  # the constructor's own arguments first, then the options, then Raises
        assert args.index("model (`torch.nn.Module`)") < args.index("optimizer (") < args.index("freeze_start (")
        assert doc.index("    Args:\n") < doc.index("    Raises:\n") < doc.index("    Example:\n")


def test_docs_options_has_a_section_for_every_option():
    text = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text()
    headings = " ".join(line for line in text.splitlines() if line.startswith("## "))
    missing = [f.name for f in dataclasses.fields(CallbackOptions) if f"`{f.name}`" not in headings]
    assert not missing, f"docs/options.md has no section for {missing}"


def test_option_arguments_derive_the_flags_from_the_definitions():
    parser = argparse.ArgumentParser()
    add_option_arguments(parser, [f.name for f in dataclasses.fields(CallbackOptions)])
    defaults = vars(parser.parse_args([]))
    assert CallbackOptions(**{**defaults, "head": None}) == CallbackOptions()
    given = ["--freeze-start", "0.25", "--order", "execution", "--no-keep-frozen", "--freeze-batchnorm"]
    given += ["--max-freeze-events", "3", "--head", "fc", "head.fc", "--check-every", "5"]
    parsed = CallbackOptions.from_kwargs(**vars(parser.parse_args(given)))
    assert (parsed.freeze_start, parsed.order, parsed.keep_frozen, parsed.freeze_batchnorm) == (
        0.25,
        "execution",
        False,
        True,
    )
    assert (parsed.max_freeze_events, parsed.head, parsed.check_every) == (3, ("fc", "head.fc"), 5)
    with pytest.raises(ValueError, match=r"names must be options of FreezeOptions .*got \['keep_frozen'\]"):
        add_option_arguments(argparse.ArgumentParser(), ["keep_frozen"], FreezeOptions)


def test_plan_takes_its_option_flags_from_the_definitions(capsys):
    from hf_layer_freeze import plan

    with pytest.raises(SystemExit):
        plan.main(["plan", "--help"])
    usage = capsys.readouterr().out
    for flag in ("--freeze-start", "--freeze-level", "--order", "--granularity", "--budget"):
        assert flag in usage
    words = " ".join(usage.split())  # argparse wraps the help
    assert "{definition,execution}" in usage and "Fraction of training, in [0, 1), at which freezing starts" in words
    assert "--freeze-start-level" in usage and "{unit,merge,skip}" in usage
    with pytest.raises(SystemExit):
        plan.main(["plan", "--model", "resnet18", "--epochs", "4", "--budget", "time"])
    assert "argument --budget: invalid choice: 'time'" in capsys.readouterr().err


def test_adding_an_option_is_one_definition():
    """What docs/options.md#adding-an-option describes: an option defined once is validated, documented, typed in
    `to_dict()` and on the command line, with nothing else written."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class WithWarmup(FreezeOptions):
        warmup_steps: int = option(0, "Optimizer steps before the schedule's clock starts.", _at_least_zero)

    assert WithWarmup.from_kwargs(warmup_steps=3).to_dict()["warmup_steps"] == 3
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0, got -1"):
        WithWarmup(warmup_steps=-1)

    @document_options(WithWarmup)
    class Documented:
        """
        A constructor.

        Args:
            model (`torch.nn.Module`): the model.
        """

    assert "warmup_steps (`int`, *optional*, defaults to 0):\n" in Documented.__doc__
    parser = argparse.ArgumentParser()
    add_option_arguments(parser, ["warmup_steps"], WithWarmup)
    assert parser.parse_args(["--warmup-steps", "7"]).warmup_steps == 7


def _at_least_zero(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def test_the_schedule_option_allows_exactly_the_schedules_that_can_be_built():
    """The `schedule` option's allowed values (options.py, no torch) and the schedules `build_schedule` can build
    (schedules.py) are two lists of one fact: they must not drift apart."""
    from hf_layer_freeze import options, schedules

    assert tuple(schedules.SCHEDULES) == options.SCHEDULES
