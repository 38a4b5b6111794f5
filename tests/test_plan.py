"""`python -m hf_layer_freeze plan`: offline plans for several timm families, transformers models and LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_layer_freeze import freeze_fraction, num_units_to_freeze
from hf_layer_freeze.plan import build_plan_model, freeze_plan, main

pytestmark = pytest.mark.slow  # subprocesses, compiles or whole-model FLOP counts: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def _simulated_run_flops(name: str, epochs: int, freeze_start: float, input_size: int) -> list[int]:
    """Ground truth for the plan: the training-step FLOPs of each epoch of a real run, the freezer updated at each
    epoch end as the method card says, every step's FLOPs counted by torch (meta device: no compute)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hf_layer_freeze import LayerFreezer

    with torch.device("meta"):
        kwargs = {"img_size": input_size} if name.startswith("vit") else {}
        model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
        x = torch.empty(1, 3, input_size, input_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = LayerFreezer(model, optimizer, freeze_start=freeze_start)
    per_epoch = []
    for epoch in range(epochs):
        counter = FlopCounterMode(display=False)
        with counter:
            model(x).sum().backward()
        optimizer.zero_grad()
        per_epoch.append(counter.get_total_flops())
        freezer.update((epoch + 1) / epochs)
    return per_epoch


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"])
def test_plan_matches_a_simulated_run(name):
    rows, saved = freeze_plan(name, epochs=6, freeze_start=0.2, freeze_level=1.0, input_size=64)
    num_units = rows[0].num_units
    expected = [0] + [num_units_to_freeze(freeze_fraction(e / 6, 0.2, 1.0), num_units) for e in range(1, 6)]
    assert [r.frozen_units for r in rows] == expected
    flops = _simulated_run_flops(name, epochs=6, freeze_start=0.2, input_size=64)
    assert [r.step_speedup for r in rows] == pytest.approx([flops[0] / f for f in flops])
    assert saved == pytest.approx(1 - sum(flops) / (6 * flops[0]))
    assert rows[-1].step_speedup > 1.5
    assert all(0 <= r.params_frozen <= 1 and 0 <= r.forward_flops_frozen <= 1 for r in rows)


def test_plan_budget_flops_freezes_half_the_compute():
    rows, _ = freeze_plan("resnet18", epochs=4, freeze_start=0.5, input_size=64, budget="flops")
    assert rows[-1].forward_flops_frozen <= 0.5
    rows_units, _ = freeze_plan("resnet18", epochs=4, freeze_start=0.5, input_size=64)
    assert rows_units[-1].forward_flops_frozen > 0.5  # half of resnet18's units is more than half its FLOPs


def test_plan_command_prints_writes_json_and_plots(tmp_path):
    command = [
        sys.executable, "-m", "hf_layer_freeze", "plan", "--model", "resnet18", "--epochs", "10",
        "--freeze-start", "0.1", "--input-size", "64", "--order", "execution", "--budget", "params",
        "--json", str(tmp_path / "plan.json"), "--plot", str(tmp_path / "plan.png"),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "predicted share of training FLOPs saved over the run" in proc.stdout
    assert "| epoch | units frozen |" in proc.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["rows"]) == 10 and 0 < plan["saved"] < 1
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_command_rejects_an_unknown_model(capsys):
    with pytest.raises(SystemExit) as exit_:  # `main` is what `python -m hf_layer_freeze plan` runs
        main(["plan", "--model", "resnet_nope", "--epochs", "3"])
    assert exit_.value.code == 2 and "--model: 'resnet_nope' is not a timm model name" in capsys.readouterr().err


# A 2-layer Llama small enough for a plan in seconds; the same sizes as --config-overrides and as LlamaConfig kwargs.
TINY_LLAMA = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
    vocab_size=1000,
)  # fmt: skip
TINY_LLAMA_OVERRIDES = ",".join(f"{key}={value}" for key, value in TINY_LLAMA.items())
SEQ_LEN, BATCH = 16, 2


def _tiny_llama(lora_targets: list[str] | None = None):
    """The ground truth's own model, built without plan.py: a meta Llama, LoRA-wrapped by PEFT if asked."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    if lora_targets:
        import peft

        config = peft.LoraConfig(r=8, target_modules=lora_targets, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    return model.train()


def _simulated_step_run(model, steps: int, **options):
    """Ground truth for a plan in steps: a run of `steps` steps, the freezer updated when it begins (progress 0) and
    after each step as `LayerFreezingCallback(freeze_every="step")` does (progress step / steps, not after the last),
    every step's training FLOPs counted by torch. Returns the freezer, per step the units frozen while it trains and
    its FLOPs, and the FLOPs of a step with nothing frozen (what the plan's speedups compare with)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hf_layer_freeze import LayerFreezer

    with torch.device("meta"):
        input_ids = torch.zeros(BATCH, SEQ_LEN, dtype=torch.long)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    freezer = LayerFreezer(model, optimizer, **options)

    def step_flops() -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            model(input_ids=input_ids).logits.float().sum().backward()
        optimizer.zero_grad()
        return counter.get_total_flops()

    unfrozen = step_flops()
    freezer.update(0.0)  # on_train_begin
    frozen, flops = [], []
    for step in range(1, steps + 1):
        flops.append(step_flops())
        frozen.append(freezer.frozen_units)
        if step < steps:
            freezer.update(step / steps)
    return freezer, frozen, flops, unfrozen


def _check_step_plan(rows, saved, frozen: list[int], flops: list[int], unfrozen: int) -> None:
    """The plan's rows are the freeze events of the simulated run, with its FLOP ratios to an unfrozen step and
    whole-run saving."""
    events = [(step, k) for step, k in enumerate(frozen, start=1) if step == 1 or k != frozen[step - 2]]
    assert [(r.step, r.frozen_units) for r in rows] == events
    assert all(r.epoch is None for r in rows)
    assert [r.step_speedup for r in rows] == pytest.approx([unfrozen / flops[step - 1] for step, _ in events])
    assert saved == pytest.approx(1 - sum(flops) / (len(flops) * unfrozen))


@pytest.mark.parametrize(
    "options",
    [
        {"freeze_start": 0.2},
        # 30% frozen from the first step, embed_tokens merged into layer 0's first unit: 19 units
        {"freeze_start": 0.0, "freeze_start_level": 0.3, "embeddings": "merge"},
    ],
)
def test_causal_lm_plan_by_model_type_in_steps_matches_a_simulated_run(options):
    rows, saved = freeze_plan(
        "llama", steps=20, config_overrides=TINY_LLAMA_OVERRIDES, seq_len=SEQ_LEN, batch_size=BATCH, **options
    )
    freezer, frozen, flops, unfrozen = _simulated_step_run(_tiny_llama(), steps=20, **options)
    _check_step_plan(rows, saved, frozen, flops, unfrozen)
    merged = options.get("embeddings") == "merge"
    assert rows[0].frozen_units == (5 if merged else 0)  # floor(0.3 * 19) from the first step
    # embedding + 9 modules per layer + final norm; not lm_head
    assert rows[0].num_units == freezer.num_units == (19 if merged else 20)
    assert len(rows) > 5 and rows[-1].step_speedup > 1.2 and 0 < saved < 1
    assert rows[-1].params_frozen == pytest.approx(
        sum(u.numel for u in freezer.units[: rows[-1].frozen_units]) / sum(u.numel for u in freezer.units)
    )


def test_plan_of_a_local_config_directory(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(**TINY_LLAMA).save_pretrained(tmp_path / "tiny-llama")
    command = [
        "plan", "--model", str(tmp_path / "tiny-llama"), "--steps", "12", "--seq-len", str(SEQ_LEN),
        "--batch-size", str(BATCH), "--json", str(tmp_path / "plan.json"), "--plot", str(tmp_path / "plan.png"),
    ]  # fmt: skip
    assert main(command) == 0
    out = capsys.readouterr().out
    assert f"built: transformers LlamaForCausalLM (causal-lm) from AutoConfig.from_pretrained('{tmp_path}" in out
    assert "| from step | units frozen | % trainable params frozen |" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    rows, saved = freeze_plan("llama", steps=12, config_overrides=TINY_LLAMA_OVERRIDES, seq_len=SEQ_LEN)
    assert [(r["step"], r["frozen_units"], r["num_units"]) for r in plan["rows"]] == [
        (r.step, r.frozen_units, r.num_units) for r in rows
    ]  # the saved config is the model type's with the same sizes
    assert plan["saved"] == pytest.approx(saved)
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # overrides apply over a saved config too
    one_layer = build_plan_model(str(tmp_path / "tiny-llama"), config_overrides="num_hidden_layers=1", seq_len=8)
    assert one_layer.model.config.num_hidden_layers == 1 and "with config overrides num_hidden_layers=1" in (
        one_layer.description
    )


def test_lora_plan_units_are_the_adapters_and_match_a_simulated_run():
    from peft.tuners.tuners_utils import BaseTunerLayer

    kwargs = dict(config_overrides=TINY_LLAMA_OVERRIDES, seq_len=SEQ_LEN, batch_size=BATCH)
    plan_model = build_plan_model("llama", lora_r=8, lora_target_modules="q_proj,v_proj", **kwargs)
    assert "LoRA r=8 on q_proj,v_proj" in plan_model.description
    rows, saved = freeze_plan(
        "llama", steps=16, freeze_start=0.25, lora_r=8, lora_target_modules="q_proj,v_proj", **kwargs
    )
    model = _tiny_llama(["q_proj", "v_proj"])
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    freezer, frozen, flops, unfrozen = _simulated_step_run(model, steps=16, freeze_start=0.25)
    _check_step_plan(rows, saved, frozen, flops, unfrozen)
    # Units are the LoRA layers (A and B together), one per wrapped module: 2 layers x (q_proj, v_proj). This needs
    # the library's "units own only parameters that train when the freezer is built" change (units.py, with
    # heads.py's PEFT resolver); before it, PEFT's frozen base weights and lm_head were units too (29 of them).
    wrapped = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert rows[0].num_units == freezer.num_units == len(wrapped) == 4
    # percentages are of the trainable parameters (the adapters; the causal LM's lm_head is frozen by PEFT)
    still_training = sum(p.numel() for p in trainable.values() if p.requires_grad)
    total = sum(p.numel() for p in trainable.values())
    assert rows[-1].params_frozen == pytest.approx(1 - still_training / total) and rows[-1].params_frozen > 0
    assert [r.frozen_units for r in rows] == [0, 1, 2, 3] and 1 < rows[1].step_speedup < rows[-1].step_speedup


def test_forward_flops_of_a_transformers_model_are_attributed_once():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hf_layer_freeze import LayerFreezer

    plan_model = build_plan_model("llama", config_overrides=TINY_LLAMA_OVERRIDES, seq_len=SEQ_LEN)
    model = plan_model.model
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    profile = freezer.profile_with(**plan_model.kwargs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**plan_model.kwargs)
    assert freezer.units[0].name == "model.embed_tokens" and profile.forward_flops[0] == 0  # a lookup, no matmul
    assert sum(profile.forward_flops) <= counter.get_total_flops()


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--model", "llama", "--steps", "10", "--task", "summarization"],
         ["argument --task: invalid choice: 'summarization'", "causal-lm", "sequence-classification",
          "image-classification"]),
        (["--model", "llama", "--steps", "10", "--task", "image-classification"],
         ["task 'image-classification': transformers has no such head for model type 'llama' (it has: causal-lm"]),
        (["--model", "no_such_model", "--steps", "10"],
         ["--model: 'no_such_model' is not a timm model name", "nor a transformers model type", "config.json"]),
        (["--model", "llama", "--steps", "10", "--epochs", "3"],
         ["argument --epochs: not allowed with argument --steps"]),
        (["--model", "llama"], ["one of the arguments --epochs --steps is required"]),
        (["--model", "llama", "--steps", "10", "--lora-r", "-1"],
         ["argument --lora-r: must be an integer >= 0 (0: no LoRA), got -1"]),
        (["--model", "vit", "--steps", "10", "--lora-r", "8"],
         ["PEFT has no default LoRA target modules for model type 'vit': name them with --lora-target-modules"]),
        (["--model", "llama", "--steps", "10", "--config-overrides", "hidden_size"],
         ["config_overrides must be key=value pairs joined by commas, got 'hidden_size'"]),
        (["--model", "llama", "--steps", "10", "--config-overrides", "no_such_key=1"],
         ["config_overrides 'no_such_key=1': key no_such_key isn't in the original config dict"]),
        (["--model", "resnet18", "--steps", "10", "--task", "causal-lm"],
         ["task applies to transformers models; 'resnet18' is a timm model"]),
        (["--model", "llama", "--steps", "10", "--freeze-every", "epoch"],
         ["--freeze-every epoch needs --epochs: a plan in steps freezes at each step"]),
        (["--model", "t5", "--steps", "10", "--task", "sequence-classification"],
         ["task 'sequence-classification': model 't5' is an encoder-decoder (t5), planned as seq2seq-lm only"]),
        (["--model", "encoder-decoder", "--steps", "10"],
         ["model 'encoder-decoder' is composed of an encoder and a decoder", "plan a directory holding its config"]),
    ],
)  # fmt: skip
def test_plan_command_refuses_in_one_line(arguments, fragments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *arguments])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and all(fragment in errors[0] for fragment in fragments), errors


def test_lora_without_peft_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    arguments = ["--steps", "10", "--config-overrides", TINY_LLAMA_OVERRIDES, "--seq-len", "8", "--lora-r", "8"]
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "llama", *arguments])
    assert exit_info.value.code == 2
    assert "error: lora_r > 0 (--lora-r) needs PEFT: pip install peft" in capsys.readouterr().err


SEQ2SEQ_OVERRIDES = {
    "t5": "num_layers=2,num_decoder_layers=2,d_model=32,d_ff=64,num_heads=2,d_kv=16,vocab_size=128",
    "bart": "encoder_layers=1,decoder_layers=1,d_model=32,encoder_ffn_dim=64,decoder_ffn_dim=64,vocab_size=128,"
    "encoder_attention_heads=2,decoder_attention_heads=2",
}


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_an_encoder_decoder_is_planned_with_the_freezers_units_and_head(model_type):
    import warnings

    import torch

    from hf_layer_freeze import LayerFreezer, find_head

    plan_model = build_plan_model(model_type, config_overrides=SEQ2SEQ_OVERRIDES[model_type], seq_len=8)
    model = plan_model.model
    assert "decoder_input_ids" in plan_model.kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a head found by rule, not guessed
        freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    head = find_head(model)
    assert head.rule is not None and id(model.get_output_embeddings().weight) in head.parameter_ids
    rows, saved = freeze_plan(
        model_type, steps=4, freeze_start=0.0, config_overrides=SEQ2SEQ_OVERRIDES[model_type], seq_len=8
    )
    assert {row.num_units for row in rows} == {freezer.num_units}
    assert rows[-1].frozen_units > 0 and rows[-1].step_speedup > 1 and saved > 0
