"""The fine-tuning tasks of `bench_finetune.py`: their data, their pretrained backbones, one fine-tuning run, and the
FLOPs of a training step with k units frozen.

Three tasks, two backbones:

- `text-lora` and `text-full`: a Llama-style causal LM (`LlamaForCausalLM` from a `LlamaConfig`) pretrained in full on
  most of the documentation topics shipped with Python (`examples/text_data.py`), then fine-tuned on the held-out
  topics with the `transformers.Trainer` and `LayerFreezingCallback`, with LoRA adapters or in full. Quality: the loss
  on the held-out end of each fine-tuning topic (lower is better), and its perplexity.
- `vision`: a timm ResNet pretrained on five of the ten classes of scikit-learn's digits, then fine-tuned with a new
  head on a few examples of each of the other five, in a plain PyTorch loop driving `LayerFreezer`. Quality: test
  accuracy on every image of those five classes that fine-tuning did not see (higher is better).

Each backbone is pretrained once, deterministically, and cached under `<output-dir>/pretrained/`, in a folder named by
a hash of every setting that changes it (model, data split, optimizer, steps, seed, device, torch threads, and the
versions of Python, torch, transformers and timm); `pretrain.json`, written last, holds its pretraining loss or
accuracy and its held-out quality, and marks the cache complete.

FLOPs are torch's count (`torch.utils.flop_counter.FlopCounterMode`: matrix products, convolutions and attention; not
elementwise work nor the optimizer update) of one training step (forward, loss, backward) on a copy of the
architecture on the meta device, frozen as the run was: a `LayerFreezer` with the same unit options on that copy, and
`freeze_units(k)` for each k. (Counted on the real model on CPU, the Llama's attention would be missing: torch's
counter has no formula for the CPU flash-attention kernel; on the meta device it is counted. The vision counts equal
the real model's.) Every batch of a run has the same shape (fixed-length text blocks, `drop_last`), so a
run's training FLOPs are exactly the sum over its steps of the step FLOPs at the frozen count of each step.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "examples") not in sys.path:  # the examples' data helpers, as bench_accuracy.py imports them
    sys.path.insert(0, str(ROOT / "examples"))

import timm  # noqa: E402
import transformers  # noqa: E402
from image_data import load_image_data  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from text_data import build_tokenizer, load_topics, split_topics, token_blocks  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    get_cosine_schedule_with_warmup,
    set_seed,
)
from transformers.utils import logging as transformers_logging  # noqa: E402

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback  # noqa: E402

transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()  # loading and saving weights
# PEFT reads a deprecated transformers attribute on every wrap; and with freeze_level=1.0 on a LoRA model the freezer
# keeps the last adapter so that the optimizer is not left empty, and says so once per run: both are expected here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*would leave the optimizer with no parameter")

UNIT_OPTIONS: dict[str, Any] = {"order": "definition", "granularity": "module"}
"""The options that decide what a unit is (the library's defaults, the card's depth-first order), given both to the
trained model's freezer and to the FLOP-counting copy's, so both freeze the same units."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAINER_SCRATCH = Path(tempfile.gettempdir()) / "bench_finetune_trainer"  # the Trainer's output_dir; nothing is saved


def lora_config() -> LoraConfig:
    """The adapters of `text-lora`: rank 8 on the attention projections, PEFT's defaults otherwise (alpha 8, no
    dropout)."""
    return LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=list(LORA_TARGETS))


@dataclass(frozen=True)
class FinetuneSettings:
    """
    One fine-tuning run's schedule: `steps` optimizer steps of `batch_size` examples, AdamW at peak `lr` with a linear
    warmup over `warmup_ratio` of the steps and a cosine decay to zero at the last step. A shorter run (a cost-matched
    baseline) compresses this whole schedule to its own length.
    """

    steps: int
    batch_size: int
    lr: float
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TextSettings:
    """The text backbone: a Llama-style model, its tokenizer, the topic split and its pretraining."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    block_size: int = 128
    vocab_size: int = 2048
    tie_word_embeddings: bool = False
    held_out_fraction: float = 0.3  # share of the characters whose topics are kept out of pretraining
    eval_fraction: float = 0.2  # share of each fine-tuning topic held out for evaluation
    split_seed: int = 0
    pretrain_steps: int = 300
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class VisionSettings:
    """The vision backbone: a timm model trained from random weights on the digits of `pretrain_classes`."""

    architecture: str = "resnet10t"
    image_size: int = 32
    pretrain_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    pretrain_epochs: int = 30
    pretrain_batch_size: int = 64
    pretrain_lr: float = 2e-3
    pretrain_weight_decay: float = 0.05
    seed: int = 0  # initialization, batches, jitter


@dataclass
class RunResult:
    """What one fine-tuning run measured."""

    steps: int
    quality: float  # held-out loss (text) or test accuracy (vision)
    train_time_s: float  # the training loop alone: no model loading, no evaluation
    step_time_s: float  # the sum of the optimizer steps' own times (forward, backward, update, freezing)
    frozen_units_per_step: list[int]  # units frozen while each step ran
    num_units: int | None
    extra: dict[str, Any]


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
    }


def cache_folder(cache_dir: Path, kind: str, settings: Any, device: str) -> Path:
    """
    `<cache_dir>/<kind>-<hash>`: the hash covers every setting, the device, the library versions and the number of
    torch threads (CPU kernels sum in an order that depends on it: the same seed at 1 and at 2 threads ends in other
    weights).
    """
    key = {"settings": asdict(settings), "device": device, "versions": versions(), "threads": torch.get_num_threads()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"{kind}-{digest}"


def synchronize(device: str) -> None:
    """A GPU runs ahead of Python: wait for it, so that the clock measures its work."""
    if device == "cuda":
        torch.cuda.synchronize()


def count_step_flops(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> int:
    """FLOPs of one training step (forward, loss, backward) as torch counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(model).backward()
    for param in model.parameters():
        param.grad = None
    return counter.get_total_flops()


def flops_by_frozen_units(
    model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]
) -> tuple[list[int], list[str]]:
    """
    `flops[k]`: one training step's FLOPs with the first k units frozen, for k = 0 .. number of units; and the unit
    names. `model` is a meta-device copy of the trained architecture, in training mode; it ends fully frozen.
    """
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    freezer = LayerFreezer(model, optimizer, **UNIT_OPTIONS)
    flops = []
    for count in range(freezer.num_units + 1):
        freezer.freeze_units(count)  # stops short of leaving the optimizer empty, as in training
        flops.append(count_step_flops(model, loss_of))
    names = [unit.name for unit in freezer.units]
    freezer.close()
    return flops, names


class FinetuneTask:
    """One fine-tuning task: `prepare()` (pretraining, cached), then `run()` any number of times."""

    name: str
    quality_name: str
    higher_is_better: bool

    def __init__(self, settings: FinetuneSettings, device: str) -> None:
        self.settings = settings
        self.device = device
        self.pretraining: dict[str, Any] = {}
        self._flops: list[int] | None = None
        self._unit_names: list[str] | None = None

    def prepare(self, cache_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def data_summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, steps: int, seed: int, freeze: dict[str, Any] | None) -> RunResult:
        raise NotImplementedError

    def _meta_model_and_loss(self) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
        raise NotImplementedError

    def step_flops(self) -> list[int]:
        """`step_flops()[k]`: one training step's FLOPs with k units frozen (counted once, on the meta device)."""
        if self._flops is None:
            model, loss_of = self._meta_model_and_loss()
            self._flops, self._unit_names = flops_by_frozen_units(model, loss_of)
        return self._flops

    def run_flops(self, frozen_units_per_step: list[int]) -> int:
        table = self.step_flops()
        return sum(table[count] for count in frozen_units_per_step)

    def check_units(self, freezer: LayerFreezer) -> None:
        """The trained model's units must be those the FLOPs were counted for."""
        self.step_flops()
        names = [unit.name for unit in freezer.units]
        if names != self._unit_names:
            raise RuntimeError(
                f"{self.name}: the trained model's freezable units differ from the FLOP-counting copy's "
                f"({len(names)} vs {len(self._unit_names)}); the FLOP count would not describe the run"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Text


class _StepRecorder(TrainerCallback):
    """Units frozen while each optimizer step runs (read when it begins), and the steps' own durations."""

    def __init__(self, freezing: LayerFreezingCallback | None, device: str) -> None:
        self.freezing = freezing
        self.device = device
        self.frozen_units: list[int] = []
        self.step_time_s = 0.0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.frozen_units.append(self.freezing.frozen_units if self.freezing is not None else 0)
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # LayerFreezingCallback puts itself first: a freeze made at the end of this step is timed with it.
        synchronize(self.device)
        self.step_time_s += time.perf_counter() - self._start


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A `Trainer` that prints nothing (with `disable_tqdm` it would print every log)."""
    trainer = Trainer(**kwargs)
    trainer.remove_callback(PrinterCallback)
    return trainer


class TextBackbone:
    """The pretrained Llama-style model and its data, shared by `text-lora` and `text-full`."""

    def __init__(self, settings: TextSettings, device: str) -> None:
        self.settings = settings
        self.device = device
        self.folder: Path | None = None
        self.info: dict[str, Any] | None = None
        split = split_topics(
            load_topics(), held_out_fraction=settings.held_out_fraction, eval_fraction=settings.eval_fraction,
            seed=settings.split_seed,
        )  # fmt: skip
        self.split = split
        self.tokenizer: PreTrainedTokenizerFast = build_tokenizer(split.pretrain.values(), settings.vocab_size)
        self.pretrain_set = token_blocks(split.pretrain.values(), self.tokenizer, settings.block_size)
        self.train_set = token_blocks(split.finetune_train.values(), self.tokenizer, settings.block_size)
        self.eval_set = token_blocks(split.finetune_eval.values(), self.tokenizer, settings.block_size)

    def config(self) -> LlamaConfig:
        s = self.settings
        return LlamaConfig(
            vocab_size=len(self.tokenizer), hidden_size=s.hidden_size, num_hidden_layers=s.num_layers,
            num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads, intermediate_size=s.intermediate_size,
            max_position_embeddings=s.block_size, bos_token_id=self.tokenizer.eos_token_id,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            tie_word_embeddings=s.tie_word_embeddings,
        )  # fmt: skip

    def data_summary(self) -> dict[str, Any]:
        split = self.split
        return {
            "source": f"pydoc_data.topics of Python {platform.python_version()}",
            "pretrain_topics": len(split.pretrain),
            "pretrain_chars": sum(map(len, split.pretrain.values())),
            "pretrain_blocks": len(self.pretrain_set),
            "finetune_topics": len(split.finetune_train),
            "finetune_train_chars": sum(map(len, split.finetune_train.values())),
            "finetune_train_blocks": len(self.train_set),
            "finetune_eval_chars": sum(map(len, split.finetune_eval.values())),
            "finetune_eval_blocks": len(self.eval_set),
            "block_size": self.settings.block_size,
        }

    def training_arguments(self, output_dir: Path, **overrides: Any) -> TrainingArguments:
        """What every Trainer here shares: no checkpoint, no report, no progress bar, equal batches."""
        on_gpu = self.device == "cuda"
        settings = {
            "output_dir": str(output_dir),  # nothing is written: save_strategy="no"
            "lr_scheduler_type": "cosine",
            "eval_strategy": "no",
            "save_strategy": "no",
            "report_to": [],
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "dataloader_drop_last": True,  # every step has the same shape, so its FLOPs are exact
            "dataloader_pin_memory": on_gpu,
            "per_device_eval_batch_size": 32,
            "use_cpu": not on_gpu,
            "bf16": on_gpu,
            **overrides,
        }
        return TrainingArguments(**settings)

    def evaluate(self, model: nn.Module, output_dir: Path) -> float:
        trainer = quiet_trainer(
            model=model, args=self.training_arguments(output_dir), eval_dataset=self.eval_set,
            data_collator=default_data_collator,
        )  # fmt: skip
        return float(trainer.evaluate()["eval_loss"])

    def prepare(self, cache_dir: Path) -> dict[str, Any]:
        """Pretrain the whole model on the pretraining topics, or load it from the cache; return `pretrain.json`."""
        s = self.settings
        folder = cache_folder(cache_dir, "text", s, self.device)
        scratch = TRAINER_SCRATCH
        if (folder / "pretrain.json").is_file():
            self.folder = folder
            self.info = {**json.loads((folder / "pretrain.json").read_text()), "cached": True}
            return self.info
        set_seed(s.seed)
        model = LlamaForCausalLM(self.config())
        before = self.evaluate(model, scratch)
        trainer = quiet_trainer(
            model=model,
            args=self.training_arguments(
                scratch, max_steps=s.pretrain_steps, per_device_train_batch_size=s.pretrain_batch_size,
                learning_rate=s.pretrain_lr, warmup_steps=0.1, weight_decay=0.0, seed=s.seed,
                logging_steps=max(1, s.pretrain_steps // 20),
            ),
            train_dataset=self.pretrain_set,
            data_collator=default_data_collator,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        info = {
            "what": "LlamaForCausalLM pretrained in full on the pretraining topics",
            "settings": asdict(s),
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "pretrain_time_s": seconds,
            "train_loss_first_logged": losses[0],
            "train_loss_last_logged": losses[-1],
            "heldout_loss_random_init": before,
            "heldout_loss_pretrained": self.evaluate(model, scratch),
            "heldout": "the held-out end of the fine-tuning topics (the fine-tuning evaluation set)",
            "data": self.data_summary(),
            "device": self.device,
            "versions": versions(),
        }
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "pretrain.json").write_text(json.dumps(info, indent=2))  # last: marks a complete cache
        self.folder = folder
        self.info = {**info, "cached": False}
        return self.info


class TextTask(FinetuneTask):
    """Fine-tuning the text backbone on the held-out topics, with LoRA (`mode="lora"`) or in full (`"full"`)."""

    quality_name = "held-out loss"
    higher_is_better = False

    def __init__(self, backbone: TextBackbone, mode: str, settings: FinetuneSettings, device: str) -> None:
        super().__init__(settings, device)
        self.backbone = backbone
        self.mode = mode
        self.name = f"text-{mode}"

    def prepare(self, cache_dir: Path) -> dict[str, Any]:
        self.pretraining = self.backbone.prepare(cache_dir) if self.backbone.info is None else self.backbone.info
        return self.pretraining

    def data_summary(self) -> dict[str, Any]:
        return self.backbone.data_summary()

    def _model(self, seed: int) -> nn.Module:
        model = LlamaForCausalLM.from_pretrained(self.backbone.folder)
        if self.mode == "lora":
            set_seed(seed)  # the adapters' initialization
            model = get_peft_model(model, lora_config())
        return model

    def run(self, steps: int, seed: int, freeze: dict[str, Any] | None) -> RunResult:
        s = self.settings
        model = self._model(seed)
        freezing = None
        if freeze is not None:
            freezing = LayerFreezingCallback(freeze_every="step", **UNIT_OPTIONS, **freeze)
        recorder = _StepRecorder(freezing, self.device)
        trainer = quiet_trainer(
            model=model,
            args=self.backbone.training_arguments(
                TRAINER_SCRATCH, max_steps=steps, per_device_train_batch_size=s.batch_size, learning_rate=s.lr,
                warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay, seed=seed, logging_steps=max(steps, 1),
            ),
            train_dataset=self.backbone.train_set,
            eval_dataset=self.backbone.eval_set,
            data_collator=default_data_collator,
            callbacks=[cb for cb in (freezing, recorder) if cb is not None],
        )  # fmt: skip
        synchronize(self.device)
        start = time.perf_counter()
        trainer.train()
        synchronize(self.device)
        seconds = time.perf_counter() - start
        if freezing is not None:
            self.check_units(freezing.freezer)
        loss = float(trainer.evaluate()["eval_loss"])  # the callback gave the frozen units back: the model as trained
        result = RunResult(
            steps=trainer.state.global_step,
            quality=loss,
            train_time_s=seconds,
            step_time_s=recorder.step_time_s,
            frozen_units_per_step=recorder.frozen_units,
            num_units=freezing.freezer.num_units if freezing is not None else None,
            extra={"perplexity": math.exp(loss), "trainable_params": _trainable(model), **_cache_stats(freezing)},
        )
        del trainer, model
        gc.collect()
        return result

    def _meta_model_and_loss(self) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
        config = self.backbone.config()
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
            if self.mode == "lora":
                model = get_peft_model(model, lora_config())
            shape = (self.settings.batch_size, self.backbone.settings.block_size)
            ids = torch.zeros(shape, dtype=torch.long)
        model.train()

        def loss_of(model: nn.Module) -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss

        return model, loss_of


def _cache_stats(freezing: LayerFreezingCallback | None) -> dict[str, Any]:
    """With activation caching: the training forwards that could use the cache, and those it served."""
    cache = freezing.freezer.activation_cache if freezing is not None and freezing.freezer is not None else None
    if cache is None:
        return {}
    return {"cache_lookups": cache.total_steps, "cache_hits": cache.total_hits}


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------------------
# Vision


def random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """
    Each image rotated by up to 10°, scaled by 0.9-1.1 and shifted by up to 10% of its side, as
    `examples/train_timm.py`'s jitter, but for the whole batch at once (one `grid_sample`) and drawn from `generator`.
    The background (-1 after normalization) fills what comes in from outside.
    """
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle, scale = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, 0.2 * u[:, 2]], 1), torch.stack([sin, cos, 0.2 * u[:, 3]], 1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, align_corners=False, padding_mode="zeros") - 1


class VisionTask(FinetuneTask):
    """Few-shot fine-tuning of a ResNet pretrained on the other digits, in a plain loop with `LayerFreezer`."""

    name = "vision"
    quality_name = "test accuracy"
    higher_is_better = True

    def __init__(
        self, vision: VisionSettings, settings: FinetuneSettings, device: str, shots: int, draw_seed: int = 0
    ) -> None:
        super().__init__(settings, device)
        self.vision = vision
        self.shots = shots
        data = load_image_data(None, None, vision.image_size, seed=0)  # the embedded digits, stratified 80/20
        train, test = data.train[:], data.test[:]  # in memory, as tensors
        train_x, train_y = train["pixel_values"], train["label"]
        test_x, test_y = test["pixel_values"], test["label"]
        pre = torch.tensor([int(y) in vision.pretrain_classes for y in train_y])
        pre_test = torch.tensor([int(y) in vision.pretrain_classes for y in test_y])
        self.classes = [c for c in range(data.num_classes) if c not in vision.pretrain_classes]
        remap = torch.full((data.num_classes,), -1, dtype=torch.long)
        remap[list(vision.pretrain_classes)] = torch.arange(len(vision.pretrain_classes))
        remap[self.classes] = torch.arange(len(self.classes))
        self.pretrain_x, self.pretrain_y = train_x[pre], remap[train_y[pre]]
        self.pretrain_test_x, self.pretrain_test_y = test_x[pre_test], remap[test_y[pre_test]]
        # The few-shot images: `shots` per class, drawn once with `draw_seed` (every seed fine-tunes on the same
        # ones). Every other image of these classes, of the test split and of the unused training images, is test data.
        draw = torch.Generator().manual_seed(draw_seed)
        chosen = []
        for c in self.classes:
            indices = (train_y == c).nonzero().flatten()
            chosen.append(indices[torch.randperm(len(indices), generator=draw)[:shots]])
        chosen_mask = torch.zeros(len(train_y), dtype=torch.bool)
        chosen_mask[torch.cat(chosen)] = True
        new_train = torch.tensor([int(y) in self.classes for y in train_y])
        new_test = ~pre_test
        self.train_x, self.train_y = train_x[chosen_mask], remap[train_y[chosen_mask]]
        rest = new_train & ~chosen_mask
        self.test_x = torch.cat([test_x[new_test], train_x[rest]])
        self.test_y = torch.cat([remap[test_y[new_test]], remap[train_y[rest]]])
        self.folder: Path | None = None

    def pretrain_data_summary(self) -> dict[str, Any]:
        return {
            "source": "scikit-learn digits (8x8, upsampled to 32x32 RGB), stratified 80/20 split (seed 0)",
            "pretrain_classes": list(self.vision.pretrain_classes),
            "pretrain_train_images": len(self.pretrain_y),
            "pretrain_test_images": len(self.pretrain_test_y),
        }

    def data_summary(self) -> dict[str, Any]:
        """The data of the pretraining and of the fine-tuning (whose few-shot draw is not part of the backbone)."""
        return {
            **self.pretrain_data_summary(),
            "finetune_classes": self.classes,
            "finetune_shots_per_class": self.shots,
            "finetune_train_images": len(self.train_y),
            "finetune_test_images": len(self.test_y),
        }

    def _new_model(self) -> nn.Module:
        v = self.vision
        return timm.create_model(v.architecture, pretrained=False, num_classes=len(v.pretrain_classes))

    def _train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: FinetuneSettings,
        steps: int,
        seed: int,
        freeze: dict[str, Any] | None,
    ) -> tuple[float, float, list[int], LayerFreezer | None, list[float]]:
        """The training loop; returns (loop seconds, summed step seconds, frozen units per step, freezer, losses)."""
        device = self.device
        model.to(device).train()
        x, y = x.to(device), y.to(device)
        generator = torch.Generator().manual_seed(seed)  # batches and jitter
        per_epoch = len(x) // settings.batch_size
        if per_epoch == 0:
            raise ValueError(f"batch size {settings.batch_size} exceeds the {len(x)} training images")
        frozen: list[int] = []
        losses: list[float] = []
        step_seconds = 0.0
        synchronize(device)
        start = time.perf_counter()
        # As in the Trainer, building the optimizer, the schedule and the freezer is part of training.
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * steps), steps)
        freezer = LayerFreezer(model, optimizer, **UNIT_OPTIONS, **freeze) if freeze is not None else None
        order = torch.arange(len(x))
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(len(x), generator=generator)
            index = order[(step % per_epoch) * settings.batch_size : (step % per_epoch + 1) * settings.batch_size]
            images = random_affine(x[index.to(device)], generator)
            frozen.append(freezer.frozen_units if freezer is not None else 0)
            synchronize(device)
            step_start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = F.cross_entropy(model(images), y[index.to(device)])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if freezer is not None:
                freezer.update((step + 1) / steps)  # as the callback's freeze_every="step"; adaptive checks inside
            synchronize(device)
            step_seconds += time.perf_counter() - step_start
            if step % max(1, per_epoch) == 0 or step == steps - 1:
                losses.append(loss.item())
        synchronize(device)
        seconds = time.perf_counter() - start
        if freezer is not None:
            freezer.unfreeze()
            freezer.close()
        return seconds, step_seconds, frozen, freezer, losses

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        correct = 0
        for i in range(0, len(x), 256):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                logits = model(x[i : i + 256].to(self.device))
            correct += int((logits.argmax(-1).cpu() == y[i : i + 256]).sum())
        model.train()
        return correct / len(x)

    def prepare(self, cache_dir: Path) -> dict[str, Any]:
        v = self.vision
        folder = cache_folder(cache_dir, "vision", v, self.device)
        self.folder = folder
        if (folder / "pretrain.json").is_file():
            self.pretraining = {**json.loads((folder / "pretrain.json").read_text()), "cached": True}
            return self.pretraining
        set_seed(v.seed)
        model = self._new_model()
        steps = v.pretrain_epochs * (len(self.pretrain_y) // v.pretrain_batch_size)
        schedule = FinetuneSettings(steps, v.pretrain_batch_size, v.pretrain_lr, 0.1, v.pretrain_weight_decay)
        seconds, _, _, _, losses = self._train(model, self.pretrain_x, self.pretrain_y, schedule, steps, v.seed, None)
        info = {
            "what": f"timm {v.architecture} (random init) trained in full on digits {list(v.pretrain_classes)}",
            "settings": asdict(v),
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": steps,
            "pretrain_time_s": seconds,
            "train_loss_first_logged": losses[0],
            "train_loss_last_logged": losses[-1],
            "pretrain_test_accuracy": self._accuracy(model, self.pretrain_test_x, self.pretrain_test_y),
            "heldout": "the test split of the pretraining classes",
            "data": self.pretrain_data_summary(),
            "device": self.device,
            "versions": versions(),
        }
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: t.cpu() for k, t in model.state_dict().items()}, folder / "model.pt")
        (folder / "pretrain.json").write_text(json.dumps(info, indent=2))  # last: marks a complete cache
        self.pretraining = {**info, "cached": False}
        return self.pretraining

    def _model(self, seed: int) -> nn.Module:
        model = self._new_model()
        model.load_state_dict(torch.load(self.folder / "model.pt", weights_only=True))
        set_seed(seed)
        model.reset_classifier(len(self.classes))  # a new head for the new classes, initialized by the seed
        return model

    def run(self, steps: int, seed: int, freeze: dict[str, Any] | None) -> RunResult:
        model = self._model(seed)
        seconds, step_seconds, frozen, freezer, losses = self._train(
            model, self.train_x, self.train_y, self.settings, steps, seed, freeze
        )
        if freezer is not None:
            self.check_units(freezer)
        accuracy = self._accuracy(model, self.test_x, self.test_y)
        result = RunResult(
            steps=steps,
            quality=accuracy,
            train_time_s=seconds,
            step_time_s=step_seconds,
            frozen_units_per_step=frozen,
            num_units=freezer.num_units if freezer is not None else None,
            extra={"final_train_loss": losses[-1]},
        )
        del model
        gc.collect()
        return result

    def _meta_model_and_loss(self) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
        v = self.vision
        with torch.device("meta"):
            model = timm.create_model(v.architecture, pretrained=False, num_classes=len(self.classes))
            images = torch.empty(self.settings.batch_size, 3, v.image_size, v.image_size)
            labels = torch.zeros(self.settings.batch_size, dtype=torch.long)
        model.train()

        def loss_of(model: nn.Module) -> torch.Tensor:
            return F.cross_entropy(model(images), labels)

        return model, loss_of
