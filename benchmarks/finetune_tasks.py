"""The fine-tuning tasks of `bench_finetune.py`, one training loop for all, and the FLOPs of a training step.

Tasks (data in `finetune_data.py`, backbones in `finetune_backbones.py`); each has a fixed, small training set that
every epoch reshuffles (so activation caching can serve from the second epoch on) and a fixed held-out set:

- `pydoc-full`, `pydoc-lora`: domain adaptation of the code LM to English, `pydoc_data.topics`: training blocks from
  the beginnings of the topics, held-out blocks from their ends; in full, or with LoRA (PEFT, r=8 on q, k, v, o).
  Quality: held-out loss (lower is better).
- `classify`: docstrings labelled by their top-level package (`CLASSIFY_PACKAGES`), from files never pretrained on,
  split by file, de-duplicated; `LlamaForSequenceClassification` on the code LM (last-token pooling, a new linear
  head), fine-tuned in full for `epochs` epochs (AutoFreeze's regime). Quality: test accuracy (higher is better).
- `vision`: the digits ResNet (pretrained on 0-4) with a new head, fine-tuned in full on `per_class` images of each
  of the digits 5-9, no augmentation (augmented inputs never repeat, so the cache could not serve; say so). Quality:
  accuracy on every other image of 5-9.
- `control`: the code LM fine-tuned on held-out source files of its own pretraining distribution (the reserved
  part, split by file): the positive control, where freezing should cost almost nothing. Quality: held-out loss.

The loop (`train`): AdamW, linear warmup over `warmup_ratio` then cosine to zero at the run's last step (a shorter
baseline compresses the whole schedule), and, for a freezing run, a `LayerFreezer` updated with `(step + 1) / steps`
after every optimizer step: the library's custom-loop path, used for every task so the clock measures the same kind
of loop everywhere (the Trainer's per-step bookkeeping would weigh more on these few-millisecond steps). Wall time:
the loop, from building the optimizer and the freezer to the last step; not model loading, not evaluation.

FLOPs: torch's `FlopCounterMode` (matrix products, convolutions, attention) of one training step (forward, loss,
backward) on a meta-device copy frozen as the run was (a `LayerFreezer` with the same unit options and
`freeze_units(k)` for each k; unit names checked against the trained model's), summed over the run's steps at each
step's frozen count, minus the forward FLOPs the activation cache skipped (`total_flops_skipped` where the cache
counts it, for the rows it served; else its whole-batch hits times the frozen prefix's forward FLOPs, counted on the
meta copy per cut). The cache's own count is 0.94 of the meta copy's for the Llama prefix (24 whole hits of
`static-50+cache` on `pydoc-full`: 12.88 against 13.69 GFLOPs, apparently the attention torch's counter does not see
on CPU) and equal to it for the ResNet, so the credit is, if anything, short: conservative for caching.
Elementwise work and the optimizer update are not counted. Every batch has the same shape (drop_last, fixed
lengths), so the count is exact.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from finetune_backbones import CodeLM, DigitsResNet, lm_loss
from finetune_data import digits_split, docstring_examples, pydoc_topics_split, source_part, token_stream
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, get_cosine_schedule_with_warmup
from transformers.utils import logging as transformers_logging

from hf_layer_freeze import FreezeOptions, LayerFreezer
from hf_layer_freeze.activation_cache import ActivationCache

transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*would leave the optimizer with no parameter")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*runs in eval mode")  # the cache's note that the prefix runs in eval mode

OPTIONS = {f.name for f in dataclasses.fields(FreezeOptions)}
HAS_START_LEVEL = "freeze_start_level" in OPTIONS
HAS_EMBEDDINGS = "embeddings" in OPTIONS
UNIT_OPTIONS: dict[str, Any] = {"granularity": "block", "order": "definition"}
if HAS_EMBEDDINGS:
    UNIT_OPTIONS["embeddings"] = "merge"  # the embeddings save no compute frozen alone: frozen with the first block
CLASSIFY_PACKAGES = ("torch", "transformers", "sympy", "pandas")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class RunSettings:
    """A task's full-length run: `steps` optimizer steps of `batch_size` examples, AdamW at peak `lr`."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1


@dataclass
class RunResult:
    steps: int
    quality: float
    train_time_s: float
    frozen_units_per_step: list[int]
    num_units: int | None
    unit_names: list[str] | None
    cache: dict[str, Any]
    skipped_flops_fallback: int  # whole-batch hits times the prefix's forward FLOPs (used without the new counter)


def _frozen_count(freezer: LayerFreezer | None) -> int:
    return 0 if freezer is None else freezer.frozen_units


class Task:
    """A fine-tuning task: `prepare()`, then `run()` any number of times (see the module docstring)."""

    name: str
    quality_name: str
    higher_is_better: bool

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.train_inputs: dict[str, torch.Tensor] = {}
        self.train_labels: torch.Tensor | None = None
        self._flops: list[int] | None = None
        self._prefix_flops: list[int] | None = None
        self._unit_names: list[str] | None = None
        self.data: dict[str, Any] = {}

    # --- per task ---------------------------------------------------------------------------------------------------
    def prepare(self, cache_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
        raise NotImplementedError

    def model(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def quality(self, model: nn.Module) -> float:
        raise NotImplementedError

    def meta_model(self) -> nn.Module:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return len(next(iter(self.train_inputs.values())))

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.settings.batch_size

    def meta_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        b = self.settings.batch_size
        with torch.device("meta"):
            inputs = {k: torch.empty((b, *v.shape[1:]), dtype=v.dtype) for k, v in self.train_inputs.items()}
            labels = None if self.train_labels is None else torch.empty(b, dtype=self.train_labels.dtype)
        return inputs, labels

    def step_flops(self) -> list[int]:
        """`step_flops()[k]`: one training step's FLOPs with k units frozen, counted on the meta device."""
        if self._flops is None:
            self._flops, self._prefix_flops, self._unit_names = count_flops(self)
        return self._flops

    def prefix_forward_flops(self) -> list[int]:
        """`[cut]`: forward FLOPs of the cache's prefix ending at block `cut` (what a whole-batch hit skips)."""
        self.step_flops()
        return self._prefix_flops

    def run(self, steps: int, seed: int, freeze: dict[str, Any] | None, static_units: int | None = None) -> RunResult:
        model = self.model(seed)
        result = train(self, model, steps, seed, freeze, static_units)
        result.quality = self.quality(model)
        del model
        gc.collect()
        return result


def train(
    task: Task, model: nn.Module, steps: int, seed: int, freeze: dict[str, Any] | None, static_units: int | None
) -> RunResult:
    """The loop (see the module docstring). `static_units`: freeze that many units before the first step and never
    update (the static-prefix fallback while `freeze_start_level` is not in the library)."""
    s = task.settings
    model.train()
    generator = torch.Generator().manual_seed(seed)
    per_epoch = task.steps_per_epoch
    frozen: list[int] = []
    prefix = task.prefix_forward_flops() if freeze and freeze.get("cache_activations") else None
    skipped_fallback = 0
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(s.warmup_ratio * steps), steps)
    freezer = LayerFreezer(model, optimizer, **UNIT_OPTIONS, **freeze) if freeze is not None else None
    cache = freezer.listener(ActivationCache) if freezer is not None else None
    if freezer is not None:
        if static_units is not None:
            freezer.freeze_units(static_units)
        else:
            freezer.update(0.0)  # freeze_start=0: what the schedule asks for at the first step
    order = torch.arange(task.num_train)
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(task.num_train, generator=generator)
        index = order[(step % per_epoch) * s.batch_size : (step % per_epoch + 1) * s.batch_size]
        inputs = {k: v[index] for k, v in task.train_inputs.items()}
        labels = None if task.train_labels is None else task.train_labels[index]
        frozen.append(_frozen_count(freezer))
        hits_before = cache.total_hits if cache is not None else 0
        loss = task.loss(model, inputs, labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cache is not None and cache.total_hits > hits_before and cache.cut >= 0:
            skipped_fallback += prefix[cache.cut]
        if freezer is not None and static_units is None:
            freezer.update((step + 1) / steps)
    seconds = time.perf_counter() - start
    stats: dict[str, Any] = {}
    if cache is not None:
        for key in ("total_steps", "total_hits", "total_rows", "total_rows_served", "total_flops_skipped"):
            if hasattr(cache, key):
                stats[key] = int(getattr(cache, key))
    names = [u.name for u in freezer.units] if freezer is not None else None
    if freezer is not None:
        freezer.unfreeze()
        freezer.close()
        task.step_flops()
        if len(names) != len(task._unit_names):
            raise RuntimeError(f"{task.name}: the trained model's units differ from the FLOP-counting copy's")
    return RunResult(
        steps=steps, quality=float("nan"), train_time_s=seconds, frozen_units_per_step=frozen,
        num_units=freezer.num_units if freezer is not None else None, unit_names=names, cache=stats,
        skipped_flops_fallback=skipped_fallback,
    )  # fmt: skip


def count_flops(task: Task) -> tuple[list[int], list[int], list[str]]:
    """(train-step FLOPs per frozen count, forward FLOPs of the cache prefix per cut, unit names), on the meta
    device."""
    from hf_layer_freeze.cache_layout import prefix_layout

    model = task.meta_model()
    model.train()
    inputs, labels = task.meta_batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    freezer = LayerFreezer(model, optimizer, **UNIT_OPTIONS)
    names = [u.name for u in freezer.units]
    flops = []
    for count in range(freezer.num_units + 1):
        freezer.freeze_units(count)
        counter = FlopCounterMode(display=False)
        with counter:
            task.loss(model, inputs, labels).backward()
        for p in model.parameters():
            p.grad = None
        flops.append(counter.get_total_flops())
    freezer.unfreeze()
    freezer.close()
    # Forward FLOPs per prefix module, by hooks reading the counter's running total.
    layout = prefix_layout(model)
    modules = [*[m for m in layout.before if any(True for _ in m.parameters())], *layout.blocks]
    counter = FlopCounterMode(display=False)
    spent: dict[int, int] = {}
    handles = []
    for i, module in enumerate(modules):
        handles.append(
            module.register_forward_pre_hook(lambda m, a, i=i: spent.__setitem__(i, -counter.get_total_flops()))
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, o, i=i: spent.__setitem__(i, spent[i] + counter.get_total_flops())
            )
        )
    with counter, torch.no_grad():
        task.loss(model, inputs, labels)
    for h in handles:
        h.remove()
    before = sum(spent[i] for i in range(len(modules) - len(layout.blocks)))
    blocks = [spent[i] for i in range(len(modules) - len(layout.blocks), len(modules))]
    prefix = [before + sum(blocks[: cut + 1]) for cut in range(len(blocks))]
    return flops, prefix, names


def _cached(folder: Path, name: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A task's data, built once per backbone (it depends on the tokenizer) and kept beside it."""
    path = folder / f"data-{name}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    data = build()
    torch.save(data, path)
    return data


def _pick(blocks: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    if len(blocks) < count:
        raise ValueError(f"needs {count} blocks, the text gives {len(blocks)}")
    return blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:count]]


# ---------------------------------------------------------------------------------------------------------------------
# Language-model tasks


@dataclass(frozen=True)
class LMTaskSettings:
    train_blocks: int = 64
    eval_blocks: int = 96
    block_size: int = 64
    lora_r: int = 8


class LMTask(Task):
    """Causal-LM fine-tuning of the code LM: `source` "pydoc" (domain adaptation) or "control"; `mode` full/lora."""

    quality_name = "held-out loss"
    higher_is_better = False

    def __init__(self, backbone: CodeLM, source: str, mode: str, settings: RunSettings, lm: LMTaskSettings) -> None:
        super().__init__(settings)
        self.backbone, self.source, self.mode, self.lm = backbone, source, mode, lm
        self.name = f"{source}-{mode}" if source == "pydoc" else source
        self.eval_set: torch.Tensor | None = None

    def prepare(self, cache_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
        info = self.backbone.prepare(cache_dir, log) if not self.backbone.info else self.backbone.info
        lm, tok = self.lm, self.backbone.tokenizer

        def build() -> dict[str, Any]:
            if self.source == "pydoc":
                train_texts, eval_texts = pydoc_topics_split()
                what = "pydoc_data.topics: the first 80% of each topic / the last 20%"
            else:
                reserved = source_part("reserved", 3_000_000)
                train_texts = [t for i, (_, t) in enumerate(reserved.files) if i % 2 == 0]
                eval_texts = [t for i, (_, t) in enumerate(reserved.files) if i % 2 == 1]
                what = f"{len(reserved.files)} reserved source files (never pretrained on), alternate files"
            train = token_stream(train_texts, tok, lm.block_size)
            held = token_stream(eval_texts, tok, lm.block_size)
            return {
                "train": _pick(train, lm.train_blocks), "eval": _pick(held, lm.eval_blocks), "what": what,
                "train_blocks_available": len(train), "eval_blocks_available": len(held),
            }  # fmt: skip

        data = _cached(self.backbone.folder, f"{self.source}-{json.dumps(dataclasses.asdict(lm))}", build)
        self.train_inputs = {"input_ids": data["train"]}
        self.eval_set = data["eval"]
        self.data = {k: v for k, v in data.items() if not isinstance(v, torch.Tensor)}
        self.data.update(
            {"train_blocks": len(data["train"]), "eval_blocks": len(data["eval"]), "block_size": lm.block_size}
        )
        return info

    def model(self, seed: int) -> nn.Module:
        model = LlamaForCausalLM.from_pretrained(self.backbone.folder)
        if self.mode == "lora":
            torch.manual_seed(seed)
            model = get_peft_model(
                model, LoraConfig(task_type="CAUSAL_LM", r=self.lm.lora_r, target_modules=LORA_TARGETS)
            )
        return model

    def loss(self, model, inputs, labels):
        return model(input_ids=inputs["input_ids"], labels=inputs["input_ids"]).loss

    def quality(self, model: nn.Module) -> float:
        return lm_loss(model, self.eval_set)

    def meta_model(self) -> nn.Module:
        with torch.device("meta"):
            model = LlamaForCausalLM(self.backbone.config())
            if self.mode == "lora":
                model = get_peft_model(
                    model, LoraConfig(task_type="CAUSAL_LM", r=self.lm.lora_r, target_modules=LORA_TARGETS)
                )
        return model


@dataclass(frozen=True)
class ClassifySettings:
    per_class: int = 12
    test_per_class: int = 100
    max_tokens: int = 32
    min_chars: int = 80


class ClassifyTask(Task):
    """Docstrings by package, `LlamaForSequenceClassification` on the code LM (see the module docstring)."""

    name = "classify"
    quality_name = "test accuracy"
    higher_is_better = True

    def __init__(self, backbone: CodeLM, settings: RunSettings, cls: ClassifySettings) -> None:
        super().__init__(settings)
        self.backbone, self.cls = backbone, cls

    def prepare(self, cache_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
        info = self.backbone.prepare(cache_dir, log) if not self.backbone.info else self.backbone.info
        c, tok = self.cls, self.backbone.tokenizer

        def build() -> dict[str, Any]:
            examples = docstring_examples(CLASSIFY_PACKAGES, c.min_chars, 4 * c.max_tokens * 4)
            out: dict[str, Any] = {"packages": list(CLASSIFY_PACKAGES)}
            for side, count in (("train", c.per_class), ("test", c.test_per_class)):
                part = examples[side]
                order = torch.randperm(len(part.texts), generator=torch.Generator().manual_seed(1)).tolist()
                chosen: list[int] = []
                taken = [0] * len(CLASSIFY_PACKAGES)
                for i in order:
                    if taken[part.labels[i]] < count:
                        chosen.append(i)
                        taken[part.labels[i]] += 1
                if min(taken) < count:
                    raise ValueError(f"classify: only {taken} {side} docstrings for {CLASSIFY_PACKAGES}")
                enc = tok(
                    [part.texts[i] for i in chosen], max_length=c.max_tokens, truncation=True, padding="max_length",
                    return_tensors="pt",
                )  # fmt: skip
                out[side] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "labels": torch.tensor([part.labels[i] for i in chosen])}  # fmt: skip
                out[f"{side}_available"] = len(part.texts)
                out[f"{side}_files"] = len({part.files[i] for i in chosen})
            return out

        data = _cached(self.backbone.folder, f"classify-{json.dumps(dataclasses.asdict(c))}", build)
        self.train_inputs = {k: data["train"][k] for k in ("input_ids", "attention_mask")}
        self.train_labels = data["train"]["labels"]
        self.test = data["test"]
        self.data = {k: v for k, v in data.items() if k not in ("train", "test")}
        self.data.update({"train_examples": self.num_train, "test_examples": len(self.test["labels"])})
        return info

    def meta_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Without the attention mask: on the meta device the mask's `.item()` checks fail; attention is counted the
        same with or without it (the padded positions are computed either way)."""
        inputs, labels = super().meta_batch()
        del inputs["attention_mask"]
        return inputs, labels

    def _config(self):
        config = self.backbone.config()
        config.num_labels = len(CLASSIFY_PACKAGES)
        return config

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the new head
        return LlamaForSequenceClassification.from_pretrained(self.backbone.folder, num_labels=len(CLASSIFY_PACKAGES))

    def loss(self, model, inputs, labels):
        return F.cross_entropy(model(**inputs).logits, labels)

    @torch.no_grad()
    def quality(self, model: nn.Module) -> float:
        model.eval()
        correct = 0
        for i in range(0, len(self.test["labels"]), 128):
            logits = model(input_ids=self.test["input_ids"][i : i + 128],
                           attention_mask=self.test["attention_mask"][i : i + 128]).logits  # fmt: skip
            correct += int((logits.argmax(-1) == self.test["labels"][i : i + 128]).sum())
        model.train()
        return correct / len(self.test["labels"])

    def meta_model(self) -> nn.Module:
        with torch.device("meta"):
            return LlamaForSequenceClassification(self._config())


# ---------------------------------------------------------------------------------------------------------------------
# Vision


@dataclass(frozen=True)
class VisionTaskSettings:
    classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    per_class: int = 20


class VisionTask(Task):
    name = "vision"
    quality_name = "test accuracy"
    higher_is_better = True

    def __init__(self, backbone: DigitsResNet, settings: RunSettings, vision: VisionTaskSettings) -> None:
        super().__init__(settings)
        self.backbone, self.vision = backbone, vision

    def prepare(self, cache_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
        info = self.backbone.prepare(cache_dir, log) if not self.backbone.info else self.backbone.info
        x, y, tx, ty = digits_split(self.vision.classes)
        draw = torch.Generator().manual_seed(0)
        chosen = torch.cat([
            (y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=draw)[: self.vision.per_class]]
            for c in range(len(self.vision.classes))
        ])  # fmt: skip
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[chosen] = False
        self.train_inputs = {"x": x[chosen]}
        self.train_labels = y[chosen]
        self.test_x, self.test_y = torch.cat([tx, x[rest]]), torch.cat([ty, y[rest]])
        self.data = {"classes": list(self.vision.classes), "train_images": len(chosen),
                     "test_images": len(self.test_y),
                     "test": "the test split of digits 5-9 and their training images not drawn"}  # fmt: skip
        return info

    def model(self, seed: int) -> nn.Module:
        return self.backbone.new_model(len(self.vision.classes), seed)

    def loss(self, model, inputs, labels):
        return F.cross_entropy(model(inputs["x"]), labels)

    @torch.no_grad()
    def quality(self, model: nn.Module) -> float:
        model.eval()
        correct = sum(
            int((model(xb).argmax(-1) == yb).sum())
            for xb, yb in zip(self.test_x.split(256), self.test_y.split(256), strict=True)
        )
        model.train()
        return correct / len(self.test_y)

    def meta_model(self) -> nn.Module:
        import timm

        with torch.device("meta"):
            return timm.create_model(self.backbone.settings.architecture, num_classes=len(self.vision.classes))
