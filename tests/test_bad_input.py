"""Bad input to the examples and to `plan` ends in one line naming the argument, never a traceback (in-process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from hf_layer_freeze import plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_timm  # noqa: E402
import train_trainer  # noqa: E402

SCRIPTS = {"train_timm": train_timm, "train_trainer": train_trainer}


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "not_a_model"], "--model: 'not_a_model' is not a timm model name"),
        (["--model", "resnet*"], "--model: 'resnet*' is not a timm model name"),
        (["--freeze-start", "1.0"], "--freeze-start must be in [0, 1), got 1.0"),
        (["--freeze-level", "-0.1"], "--freeze-level must be in [0, 1], got -0.1"),
        (["--batch-size", "0"], "--batch-size must be positive, got 0"),
        (["--epochs", "0"], "--epochs must be positive, got 0"),
        (["--epochs", "-1"], "--epochs must be positive, got -1"),
    ],
)
def test_example_arguments_out_of_range_are_one_line(capsys, script, args, message):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].parse_args(args)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: {message}" in last, last


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_examples_accept_tagged_timm_names(script):
    assert SCRIPTS[script].parse_args(["--model", "resnet18.a1_in1k"]).model == "resnet18.a1_in1k"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_corrupt_image_under_data_dir_is_one_line(tmp_path, capsys, script):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert message.startswith("error: --data-dir: an image cannot be decoded") and "broken.png" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet*", "--epochs", "4"], "--model: 'resnet*' is not a timm model name"),
        (["--model", "resnet18", "--epochs", "0"], "epochs must be a positive integer, got 0"),
        (["--model", "resnet18", "--epochs", "4", "--json", "{missing}/plan.json"], "--json: the folder"),
        (["--model", "resnet18", "--epochs", "4", "--plot", "{missing}/plan.png"], "--plot: the folder"),
    ],
)
def test_plan_bad_input_is_one_line_before_any_output(tmp_path, capsys, args, message):
    args = [a.replace("{missing}", str(tmp_path / "missing")) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["plan", *args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""  # no table printed before the error
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_plan_accepts_a_tagged_timm_name(capsys):
    assert plan.main(["plan", "--model", "resnet18.a1_in1k", "--epochs", "2", "--input-size", "32"]) == 0
    assert "resnet18.a1_in1k" in capsys.readouterr().out
