"""The examples, run as a user runs them, on a few steps: outputs exist and hold sane values."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from helpers import free_port
from PIL import Image

pytestmark = pytest.mark.slow  # subprocesses, compiles or whole-model FLOP counts: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMOKE = ["--epochs", "2", "--max-train-samples", "128", "--max-eval-samples", "64", "--batch-size", "32"]


def _run(command: list[str], timeout: int = 300, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", **env}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def _example(script: str) -> ModuleType:
    """An example script imported in this process (its `main(argv)` is what `python examples/<script>` runs): the
    argument checks run without a new interpreter importing torch."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{Path(script).stem}", ROOT / "examples" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return module


def _check_clear_error(script: str, argv: list[str], message: str, capsys) -> None:
    """`main(argv)` exits non-zero with `message` on stderr (argparse's `error:`) or as the exit message, and with no
    exception but `SystemExit` (in a shell: one line, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        _example(script).main(argv)
    assert exit_.value.code != 0
    assert message in capsys.readouterr().err + str(exit_.value.code)


def _check_compare_outputs(out: Path, processes: int, mixed_precision: str = "no") -> dict:
    results = json.loads((out / "results.json").read_text())
    baseline, frozen = results["runs"]
    assert (baseline["run"], frozen["run"]) == ("baseline", "freeze")
    for run in (baseline, frozen):
        assert run["processes"] == processes and run["mixed_precision"] == mixed_precision
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["train_time_s"] > 0 and run["images_per_s"] > 0
        assert [c["epoch"] for c in run["curve"]] == [0, 1, 2]
    assert baseline["final_frozen_units"] == 0 and baseline["final_fraction"] == 0
    assert frozen["final_frozen_units"] == frozen["num_units"] > 0 and frozen["final_fraction"] == 1.0
    assert frozen["curve"][1]["frozen_units"] == frozen["num_units"] // 2  # freeze_start 0: half after epoch 1
    # what the run reports, never how fast it was (timing claims belong in benchmarks)
    assert results["time_saved"] == pytest.approx(1 - frozen["train_time_s"] / baseline["train_time_s"])
    assert (out / "freezing.png").read_bytes()[:8] == PNG_MAGIC
    return results


def test_train_timm_compare_smoke(tmp_path):
    proc = _ok(
        _run(
            [
                sys.executable,
                "examples/train_timm.py",
                "--compare",
                "--freeze-start",
                "0",
                *SMOKE,
                "--output-dir",
                str(tmp_path),
            ]
        )
    )
    _check_compare_outputs(tmp_path, processes=1)
    assert "| baseline |" in proc.stdout and "| freeze |" in proc.stdout


def test_train_timm_max_steps_and_no_freeze(tmp_path):
    _ok(
        _run(
            [
                sys.executable,
                "examples/train_timm.py",
                "--no-freeze",
                "--max-steps",
                "3",
                *SMOKE,
                "--output-dir",
                str(tmp_path),
            ]
        )
    )
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["run"] == "baseline" and run["steps"] == 3 and run["epochs"] == 1


def test_train_timm_reads_an_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    _ok(
        _run(
            [
                sys.executable,
                "examples/train_timm.py",
                "--data-dir",
                str(tmp_path / "data"),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
    )
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["steps"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-dir", "/does/not/exist"], "--data-dir: '/does/not/exist' is not a directory"),
        (["--model", "resnet_does_not_exist"], "--model: 'resnet_does_not_exist' is not a timm model name"),
        (["--freeze-start", "1.5"], "--freeze-start must be in [0, 1), got 1.5"),
        (["--dataset", "x", "--data-dir", "y"], "--dataset and --data-dir are exclusive"),
    ],
)
def test_train_timm_bad_input_is_a_clear_error(tmp_path, args, message, capsys):
    _check_clear_error("train_timm.py", [*args, "--output-dir", str(tmp_path)], message, capsys)


def test_train_timm_malformed_imagefolder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("no images here")
    proc = _run([sys.executable, "examples/train_timm.py", "--data-dir", str(tmp_path / "data")])
    assert proc.returncode != 0 and "--data-dir" in proc.stderr and "Traceback" not in proc.stderr


def test_train_trainer_checkpoints_each_epoch_and_resumes(tmp_path):
    common = [
        sys.executable,
        "examples/train_trainer.py",
        "--max-train-samples",
        "128",
        "--max-eval-samples",
        "64",
        "--batch-size",
        "32",
        "--freeze-start",
        "0",
        "--freeze-every",
        "epoch",  # the card's rule, at each epoch end: what the checkpoints below hold
        "--output-dir",
        str(tmp_path),
        "--use-cpu",
    ]
    first = _ok(_run([*common, "--epochs", "2"]))
    assert "final test accuracy" in first.stdout
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-4", "checkpoint-8"]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["LayerFreezingCallback"]["attributes"]["saved_frozen_units"] == 14
    evals = [log for log in state["log_history"] if "eval_accuracy" in log]
    assert len(evals) == 1 and 0 <= evals[0]["eval_accuracy"] <= 1
    resumed = _ok(_run([*common, "--epochs", "3", "--resume"]))
    assert (
        "Resuming training from checkpoint" in resumed.stderr + resumed.stdout or (tmp_path / "checkpoint-12").is_dir()
    )
    assert (tmp_path / "checkpoint-12").is_dir()
    final = json.loads((tmp_path / "checkpoint-12" / "trainer_state.json").read_text())
    # resumed at step 8 of 12 with 8/12 of training done: floor(2/3 * 28) = 18 frozen; none after the last step
    assert final["stateful_callbacks"]["LayerFreezingCallback"]["attributes"]["saved_frozen_units"] == 18
    assert "frozen units 18/28" in resumed.stdout


def test_train_trainer_resume_without_checkpoint_is_a_clear_error(tmp_path):
    proc = _run([sys.executable, "examples/train_trainer.py", "--resume", "--output-dir", str(tmp_path), "--use-cpu"])
    assert proc.returncode != 0 and "--resume: no checkpoint-* folder" in proc.stderr


@pytest.mark.multiprocess
def test_train_timm_two_processes_bf16(tmp_path):
    port = str(free_port())
    _ok(
        _run(
            [
                str(BIN / "accelerate"),
                "launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--main_process_port",
                port,
                "--mixed_precision",
                "bf16",
                "examples/train_timm.py",
                "--compare",
                "--freeze-start",
                "0",
                "--mixed-precision",
                "bf16",
                *SMOKE,
                "--output-dir",
                str(tmp_path),
            ],
            OMP_NUM_THREADS="1",
        )
    )
    results = _check_compare_outputs(tmp_path, processes=2, mixed_precision="bf16")
    assert results["runs"][1]["steps"] == 4  # 128 images / (32 per process x 2 processes) x 2 epochs


@pytest.mark.multiprocess
def test_train_trainer_two_processes(tmp_path):
    port = str(free_port())
    proc = _ok(
        _run(
            [
                str(BIN / "torchrun"),
                "--nproc_per_node",
                "2",
                "--master_port",
                port,
                "examples/train_trainer.py",
                "--use-cpu",
                *SMOKE,
                "--freeze-start",
                "0",
                "--freeze-every",
                "epoch",
                "--output-dir",
                str(tmp_path),
            ],
            OMP_NUM_THREADS="1",
        )
    )
    assert "frozen units 14/28" in proc.stdout  # half after epoch 1 of 2; no freeze after the last step
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


LORA_SMOKE = [
    "--pretrain-steps", "5", "--max-steps", "8", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2",
    "--intermediate-size", "64", "--block-size", "32", "--vocab-size", "512", "--batch-size", "8", "--use-cpu",
]  # fmt: skip


def test_train_lora_smoke_compares_and_freezes_then_reuses_the_pretrained_model(tmp_path):
    command = [sys.executable, "examples/train_lora.py", *LORA_SMOKE, "--output-dir", str(tmp_path)]
    first = _ok(_run(command, OMP_NUM_THREADS="1"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["pretraining"]["steps"] == 5 and not results["pretraining"]["cached"]
    assert np.isfinite(results["pretraining"]["last_logged_loss"])
    baseline, freeze = results["runs"]
    assert (baseline["run"], freeze["run"]) == ("baseline", "freeze")
    for run in (baseline, freeze):
        assert run["steps"] == 8 and len(run["step_times_s"]) == 8
        assert np.isfinite(run["eval_loss"]) and run["perplexity"] == pytest.approx(np.exp(run["eval_loss"]))
        assert run["train_time_s"] > 0 and run["steps_per_s"] > 0
    assert baseline["frozen_units"] == 0
    assert 0 < freeze["frozen_units"] <= freeze["num_units"]
    assert results["frozen_part_steps"] and freeze["frozen_part_steps_per_s"] > 0
    assert "| baseline |" in first.stdout and "| freeze |" in first.stdout

    again = _ok(_run([*command, "--no-compare"], OMP_NUM_THREADS="1"))
    assert "pretraining (cached in" in again.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["pretraining"]["cached"] and [run["run"] for run in results["runs"]] == ["freeze"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-modules", "q_proj", "qkv"], "--target-modules must be among q_proj, k_proj, v_proj, o_proj"),
        (["--num-heads", "3"], "--num-heads must divide --hidden-size 128, got 3"),
    ],
)
def test_train_lora_bad_input_is_a_clear_error(tmp_path, args, message, capsys):
    _check_clear_error("train_lora.py", [*args, "--output-dir", str(tmp_path)], message, capsys)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("train_timm.py", "--epochs EPOCHS passes over the training images (default: 12)"),
        ("train_trainer.py", "--epochs EPOCHS passes over the training images (default: 12)"),
        ("train_lora.py", "--epochs EPOCHS fine-tuning epochs (default: 3)"),
    ],
)
def test_examples_help_shows_defaults(script, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        _example(script).main(["--help"])
    stdout = capsys.readouterr().out
    assert exit_.value.code == 0
    assert expected in " ".join(stdout.split())  # argparse wraps lines to the terminal's width
    assert "(default: 0.5)" in stdout  # --freeze-start


@pytest.fixture(scope="module")
def text_data():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import text_data

        yield text_data
    finally:
        sys.path.remove(str(ROOT / "examples"))


def test_text_data_split_shares_no_topic(text_data):
    topics = text_data.load_topics()
    split = text_data.split_topics(topics, held_out_fraction=0.3, eval_fraction=0.2, seed=0)
    assert set(split.pretrain).isdisjoint(split.finetune_train)
    assert set(split.pretrain) | set(split.finetune_train) == set(topics)
    assert split.finetune_eval and set(split.finetune_eval) <= set(split.finetune_train)
    for name, text in split.finetune_eval.items():  # the held-out end of the topic, disjoint from its training text
        assert topics[name].startswith(split.finetune_train[name]) and topics[name].endswith(text)
        assert len(split.finetune_train[name]) + len(text) <= len(topics[name])
    held_out = sum(len(topics[name]) for name in split.finetune_train) / sum(map(len, topics.values()))
    assert 0.3 <= held_out < 0.3 + max(map(len, topics.values())) / sum(map(len, topics.values()))
    assert text_data.split_topics(topics, seed=0) == text_data.split_topics(topics, seed=0)
    assert text_data.split_topics(topics, seed=1).finetune_train.keys() != split.finetune_train.keys()
    with pytest.raises(ValueError, match="held_out_fraction must be in"):
        text_data.split_topics(topics, held_out_fraction=1.0)


def test_text_data_tokenizer_round_trips_a_sentence(text_data, tmp_path):
    split = text_data.split_topics(text_data.load_topics())
    tokenizer = text_data.build_tokenizer(split.pretrain.values(), vocab_size=512)
    sentence = "The assert statement is a convenient way to insert debugging assertions into a program."
    ids = tokenizer(sentence)["input_ids"]
    assert tokenizer.decode(ids) == sentence and len(ids) < len(sentence) / 2
    assert len(tokenizer) == 512
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    again = text_data.build_tokenizer(split.pretrain.values(), vocab_size=512, cache_dir=tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab()  # deterministic
    assert len(list(tmp_path.glob("tokenizer-*/tokenizer.json"))) == 1
    cached = text_data.build_tokenizer(split.pretrain.values(), vocab_size=512, cache_dir=tmp_path)
    assert cached(sentence)["input_ids"] == ids


def test_text_data_token_blocks_have_the_requested_length(text_data):
    split = text_data.split_topics(text_data.load_topics())
    tokenizer = text_data.build_tokenizer(split.pretrain.values(), vocab_size=512)
    texts = list(split.finetune_eval.values())
    blocks = text_data.token_blocks(texts, tokenizer, block_size=64)
    ids = []  # run_clm's recipe: each text, then the end-of-sequence token, all concatenated
    for text in texts:
        ids += [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert len(blocks) == len(ids) // 64 > 0
    assert blocks.column_names == ["input_ids", "attention_mask", "labels"]
    for row in blocks:
        assert len(row["input_ids"]) == 64 and row["labels"] == row["input_ids"] and set(row["attention_mask"]) == {1}
    assert [token for row in blocks for token in row["input_ids"]] == ids[: len(blocks) * 64]
    with pytest.raises(ValueError, match="block_size 100000 is longer than the whole text"):
        text_data.token_blocks(texts[:1], tokenizer, block_size=100_000)
