"""The two backbones of `bench_finetune.py`, pretrained here once and cached.

- `CodeLM`: a Llama-style causal LM (`LlamaConfig`, untied embeddings: tied, the input embedding would be the head,
  never frozen, and the backward would always run down to it) pretrained from random weights on Python source read
  from disk (`finetune_data.py`: the standard library and the installed packages, split by file). The schedule is
  warmup-stable-decay: a linear warmup, then a constant learning rate while the held-out loss (every `eval_every`
  steps, on `eval_blocks` blocks of the held-out files) still improves by at least `plateau_improvement` (relative)
  over the last `plateau_evals` evaluations, and until `max_steps` or `max_stable_cpu_minutes` of process CPU time
  (the compute done: a wall-clock cap on a shared machine stopped a first attempt after a fifth of the work); then a
  linear decay to zero over `cooldown_fraction` of the steps done. The curve is in `pretrain.json`. The stopping
  point depends on the loss (deterministic for a given machine and thread count) unless the CPU-time cap hits first
  (then on the machine's speed): `pretrain.json` says which. At 1 thread the cap is about that many minutes on a
  quiet machine; at 2 threads about half.
- `DigitsResNet`: a timm ResNet pretrained from random weights on the digits 0-4 (scikit-learn's digits).

Each is cached under `<cache-dir>/<kind>-<hash>`, the hash covering its settings, the corpus it read (file count and
characters) and the versions of Python, torch, transformers, timm and tokenizers; not the torch thread count (CPU
kernels sum in a thread-dependent order, so the weights differ in the last bits between thread counts, but a backbone
pretrained at 1 thread in the background serves a run at 2). `pretrain.json`, written last, marks a complete cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from finetune_data import python_source_files, source_part, token_stream, train_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "tokenizers": tokenizers.__version__,
    }


def cache_folder(cache_dir: Path, kind: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps({**key, "versions": versions()}, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{kind}-{digest}"


@dataclass(frozen=True)
class LMSettings:
    """The code LM, its tokenizer, its corpus and its pretraining."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 2048
    block_size: int = 128
    pretrain_chars: int = 12_000_000  # of the pretraining files, in hash order
    heldout_chars: int = 600_000
    tokenizer_chars: int = 2_000_000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    eval_every: int = 200
    eval_blocks: int = 128
    plateau_evals: int = 3
    plateau_improvement: float = 0.01
    max_steps: int = 6000
    max_stable_cpu_minutes: float = 19.0  # process CPU time: the compute done, whatever else loads the machine
    cooldown_fraction: float = 0.15
    seed: int = 0


QUICK_LM = LMSettings(
    pretrain_chars=400_000, heldout_chars=100_000, tokenizer_chars=200_000, max_steps=24, eval_every=12, eval_blocks=32
)
"""`--quick`'s backbone: a few seconds of pretraining, so a smoke run needs no cache; it settles nothing."""


class CodeLM:
    """The pretrained code LM: `prepare(cache_dir)` pretrains or loads it; then `folder`, `tokenizer`, `config()`."""

    def __init__(self, settings: LMSettings) -> None:
        self.settings = settings
        self.folder: Path | None = None
        self.tokenizer: PreTrainedTokenizerFast | None = None
        self.info: dict[str, Any] = {}

    def config(self) -> LlamaConfig:
        s, t = self.settings, self.tokenizer
        return LlamaConfig(
            vocab_size=len(t), hidden_size=s.hidden_size, num_hidden_layers=s.num_layers,
            num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads, intermediate_size=s.intermediate_size,
            max_position_embeddings=s.block_size, bos_token_id=t.eos_token_id, eos_token_id=t.eos_token_id,
            pad_token_id=t.pad_token_id, tie_word_embeddings=False,
        )  # fmt: skip

    def prepare(self, cache_dir: Path, log=print) -> dict[str, Any]:
        s = self.settings
        files = python_source_files()
        pretrain = source_part("pretrain", s.pretrain_chars, files=files)
        heldout = source_part("heldout", s.heldout_chars, files=files)
        corpus = {
            "pretrain_files": len(pretrain.files),
            "pretrain_chars": pretrain.chars,
            "heldout_files": len(heldout.files),
            "heldout_chars": heldout.chars,
            "source_files_found": len(files),
        }
        # The key leaves the corpus out (a package installed later would otherwise void a 25-minute pretraining); a
        # cached backbone whose corpus differs from today's is used with a warning naming both.
        folder = cache_folder(cache_dir, "codelm", {"settings": asdict(s)})
        self.folder = folder
        if (folder / "pretrain.json").is_file():
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
            self.info = {**json.loads((folder / "pretrain.json").read_text()), "cached": True}
            then = {k: v for k, v in self.info["corpus"].items() if k != "source_files_found"}
            now = {k: v for k, v in corpus.items() if k != "source_files_found"}
            if then != now:
                log(f"codelm: warning: the cached backbone was pretrained on {then}, the disk now gives {now}")
            return self.info
        start_all = time.perf_counter()
        texts = [text for _, text in pretrain.files]
        self.tokenizer = train_tokenizer(texts, s.vocab_size, s.tokenizer_chars)
        blocks = token_stream(texts, self.tokenizer, s.block_size)
        held = token_stream([text for _, text in heldout.files], self.tokenizer, s.block_size)
        generator = torch.Generator().manual_seed(s.seed)
        held = held[torch.randperm(len(held), generator=generator)[: s.eval_blocks]]
        prepare_s = time.perf_counter() - start_all
        log(f"codelm: {len(blocks)} pretraining blocks of {s.block_size} tokens, {len(held)} held-out blocks")
        torch.manual_seed(s.seed)
        model = LlamaForCausalLM(self.config())
        info = pretrain_lm(model, blocks, held, s, generator, log)
        info.update(
            {
                "what": "LlamaForCausalLM (untied) pretrained from random weights on Python source files",
                "settings": asdict(s),
                "corpus": corpus,
                "pretrain_tokens_available": int(blocks.numel()),
                "parameters": sum(p.numel() for p in model.parameters()),
                "data_prepare_s": prepare_s,
                "torch_threads": torch.get_num_threads(),
                "load_average_1min_at_end": os.getloadavg()[0],
                "versions": versions(),
            }
        )
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "pretrain.json").write_text(json.dumps(info, indent=2))  # last: marks a complete cache
        self.info = {**info, "cached": False}
        return self.info


@torch.no_grad()
def lm_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss over `blocks` (every block the same length, so the mean of the batch means)."""
    was_training = model.training
    model.eval()
    losses = [float(model(input_ids=b, labels=b).loss) for b in blocks.split(batch_size)]
    model.train(was_training)
    weights = [len(b) for b in blocks.split(batch_size)]
    return sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)


def pretrain_lm(model, blocks, held, s: LMSettings, generator, log) -> dict[str, Any]:
    """Warmup-stable-decay pretraining (see the module docstring); returns the curve and where it stopped."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    curve = [{"step": 0, "heldout_loss": lm_loss(model, held), "seconds": 0.0}]
    log(f"codelm: step 0 held-out loss {curve[0]['heldout_loss']:.4f}")
    order = torch.randperm(len(blocks), generator=generator)
    cursor, step, epochs = 0, 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    stop_reason, cooldown_from, cooldown_steps = None, None, 0
    train_losses = []
    while True:
        if cooldown_from is None:
            lr = s.lr * min(1.0, (step + 1) / s.warmup_steps)
        else:
            lr = s.lr * max(0.0, 1 - (step - cooldown_from) / cooldown_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + s.batch_size > len(order):
            order, cursor, epochs = torch.randperm(len(blocks), generator=generator), 0, epochs + 1
        batch = blocks[order[cursor : cursor + s.batch_size]]
        cursor += s.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_losses.append(loss.item())
        if cooldown_from is not None:
            if step - cooldown_from >= cooldown_steps:
                break
            continue
        if step % s.eval_every == 0:
            curve.append(
                {
                    "step": step,
                    "heldout_loss": lm_loss(model, held),
                    "train_loss": sum(train_losses[-s.eval_every :]) / s.eval_every,
                    "seconds": time.perf_counter() - start,
                }
            )
            log(f"codelm: step {step} held-out loss {curve[-1]['heldout_loss']:.4f} ({curve[-1]['seconds']:.0f} s)")
            if len(curve) > s.plateau_evals + 1:
                before = curve[-1 - s.plateau_evals]["heldout_loss"]
                if curve[-1]["heldout_loss"] > (1 - s.plateau_improvement) * before:
                    stop_reason = (
                        f"plateau: improved by less than {s.plateau_improvement:.0%} over the last "
                        f"{s.plateau_evals} evaluations"
                    )
        if stop_reason is None and step >= s.max_steps:
            stop_reason = f"step cap {s.max_steps}"
        if stop_reason is None and time.process_time() - cpu_start > 60 * s.max_stable_cpu_minutes:
            stop_reason = f"CPU-time cap {s.max_stable_cpu_minutes} min (the stopping step depends on the machine)"
        if stop_reason is not None:
            cooldown_from, cooldown_steps = step, max(1, math.ceil(s.cooldown_fraction * step))
            log(f"codelm: {stop_reason}; cooling down over {cooldown_steps} steps")
    seconds = time.perf_counter() - start
    final = lm_loss(model, held)
    curve.append({"step": step, "heldout_loss": final, "seconds": seconds, "after_cooldown": True})
    log(f"codelm: done, {step} steps, held-out loss {final:.4f}, {seconds:.0f} s")
    return {
        "steps": step,
        "epochs": epochs + cursor / len(blocks),
        "stable_steps": cooldown_from,
        "cooldown_steps": cooldown_steps,
        "stop_reason": stop_reason,
        "pretrain_time_s": seconds,
        "pretrain_cpu_s": time.process_time() - cpu_start,
        "heldout_loss_random_init": curve[0]["heldout_loss"],
        "heldout_loss_pretrained": final,
        "curve": curve,
    }


@dataclass(frozen=True)
class VisionSettings:
    """The vision backbone: timm `architecture` trained from random weights on the digits of `pretrain_classes`."""

    architecture: str = "resnet10t"
    pretrain_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0


class DigitsResNet:
    """The vision backbone: `prepare(cache_dir)` pretrains or loads it; `new_model(num_classes, seed)`."""

    def __init__(self, settings: VisionSettings) -> None:
        self.settings = settings
        self.folder: Path | None = None
        self.info: dict[str, Any] = {}

    def prepare(self, cache_dir: Path, log=print) -> dict[str, Any]:
        from finetune_data import digits_split

        v = self.settings
        folder = cache_folder(cache_dir, "digits", {"settings": asdict(v)})
        self.folder = folder
        if (folder / "pretrain.json").is_file():
            self.info = {**json.loads((folder / "pretrain.json").read_text()), "cached": True}
            return self.info
        x, y, tx, ty = digits_split(v.pretrain_classes)
        torch.manual_seed(v.seed)
        model = timm.create_model(v.architecture, pretrained=False, num_classes=len(v.pretrain_classes))
        optimizer = torch.optim.AdamW(model.parameters(), lr=v.lr, weight_decay=v.weight_decay)
        steps = v.epochs * (len(x) // v.batch_size)
        schedule = transformers.get_cosine_schedule_with_warmup(optimizer, steps // 10, steps)
        generator = torch.Generator().manual_seed(v.seed)
        start = time.perf_counter()
        model.train()
        per_epoch = len(x) // v.batch_size
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(len(x), generator=generator)
            index = order[(step % per_epoch) * v.batch_size : (step % per_epoch + 1) * v.batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            accuracy = float((model(tx).argmax(-1) == ty).float().mean())
        info = {
            "what": f"timm {v.architecture} (random init) trained in full on digits {list(v.pretrain_classes)}",
            "settings": asdict(v),
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": steps,
            "pretrain_time_s": seconds,
            "final_train_loss": float(loss),
            "pretrain_test_accuracy": accuracy,
            "versions": versions(),
        }
        log(f"digits: pretrained {steps} steps in {seconds:.0f} s, test accuracy {accuracy:.2%}")
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "model.pt")
        (folder / "pretrain.json").write_text(json.dumps(info, indent=2))
        self.info = {**info, "cached": False}
        return self.info

    def new_model(self, num_classes: int, seed: int) -> torch.nn.Module:
        v = self.settings
        model = timm.create_model(v.architecture, pretrained=False, num_classes=len(v.pretrain_classes))
        model.load_state_dict(torch.load(self.folder / "model.pt", weights_only=True))
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
        return model
