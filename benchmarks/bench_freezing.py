#!/usr/bin/env python
"""Step speed against freeze depth, with the library's own `LayerFreezer` doing the freezing.

    python benchmarks/bench_freezing.py            # resnet18, resnet50, vit_tiny at f in {0, .25, .5, .75, 1}
    python benchmarks/bench_freezing.py --quick    # resnet18 only, fewer repetitions (under 3 minutes on 2 cores)
    python benchmarks/bench_freezing.py --device cuda --image-size 224 --batch-size 128   # on a GPU
    python benchmarks/bench_freezing.py --compile --quick    # torch.compile: compiled against eager, per fraction
    python benchmarks/bench_freezing.py --lora     # a Llama causal LM with LoRA: its adapters frozen by depth
    python benchmarks/bench_freezing.py --lora --device cuda    # the same, larger, in bf16 (16 layers, hidden 1024)

For each model and frozen fraction f of the freezable units it reports the median step time (forward, backward,
SGD step; configurations interleaved, warm-up discarded), the FLOP-ideal speedup (forward+backward FLOPs counted by
`torch.utils.flop_counter.FlopCounterMode`), the measured speedup, the efficiency (measured saving / ideal saving),
the fractions of forward FLOPs and of trainable parameters frozen, and the bytes autograd saves for backward. It
also measures the overhead of an attached freezer with nothing frozen. Writes JSON, a PNG figure and prints a markdown
table.

With `--lora`, the model is a randomly initialized `LlamaForCausalLM` (8 layers, hidden 256, vocabulary 2048; on cuda
16 layers, hidden 1024, vocabulary 32000; `--config-overrides` changes either) wrapped by PEFT with LoRA on q, k, v and
o, trained on random token ids (8 × 128 tokens, on cuda 16 × 512) with AdamW over the trainable parameters. Its units
are the LoRA layers (PEFT's frozen base weights are nobody's unit), so f is the share of adapters frozen. The freezer
never leaves the optimizer empty, so at f = 1 the last adapter still trains (the table shows what was frozen). Its
"fwd FLOPs frozen" is the library's attribution (`profile_units`), which gives a unit its own FLOPs: the adapters'
matmuls, not those of the frozen base weights they sit on. On CPU, `FlopCounterMode` does not count SDPA's attention
(`_scaled_dot_product_flash_attention_for_cpu`, about 5% of the default step's FLOPs), so the ideal leaves it out.

With `--compile`, one `torch.compile`d model goes through the fractions in order, as in training (each fraction is a
freeze event of its `LayerFreezer`), beside an eager copy frozen alike. For each fraction it reports the compiled
step, the eager step at the same fraction, the compiled unfrozen step, and the recompile cost of the event (the
first compiled step after the freeze, minus a compiled step).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_layer_freeze import LayerFreezer, freezable_units, num_units_to_freeze
from hf_layer_freeze.plan import _parse_config_overrides
from hf_layer_freeze.profiling import profile_units

MODELS = {
    "resnet18": {},
    "resnet50": {},
    "vit_tiny_patch16_224": {"patch_size": 8},  # patch 8 on 64 px: 64 tokens
}


# --lora: the Llama configuration per device (--config-overrides changes it), and (batch size, sequence length).
LORA_LLAMA = {
    "cpu": {
        "num_hidden_layers": 8,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 2048,
    },
    "cuda": {
        "num_hidden_layers": 16,
        "hidden_size": 1024,
        "intermediate_size": 2752,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
    },
}
LORA_BATCH = {"cpu": (8, 128), "cuda": (16, 512)}
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def create(name: str, image_size: int) -> torch.nn.Module:
    kwargs = dict(MODELS.get(name, {}))
    if name.startswith("vit"):
        kwargs["img_size"] = image_size
    return timm.create_model(name, pretrained=False, num_classes=100, **kwargs)


def classification_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=labels).loss  # transformers shifts the labels


@dataclass(frozen=True, eq=False)
class Workload:
    """A model to freeze, one training batch `(x, y)`, how a step computes its loss, and its optimizer."""

    name: str
    base: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = classification_loss
    optimizer: str = "sgd"
    description: str = ""


def timm_workload(name: str, args) -> Workload:
    torch.manual_seed(0)
    base = create(name, args.image_size)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch_size,), device=args.device)
    return Workload(name, base, x, y, description=f"batch {args.batch_size} at {args.image_size} px")


def lora_workload(args) -> Workload:
    """A randomly initialized Llama causal LM with LoRA adapters on q, k, v and o (PEFT freezes the rest)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(LORA_LLAMA[args.device])
    if args.config_overrides:
        values.update(_parse_config_overrides(LlamaConfig(**values), args.config_overrides))
    # built from the values, so that derived sizes (head_dim) follow them; no KV cache in training
    config = LlamaConfig(**{**values, "use_cache": False})
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len must be at most max_position_embeddings={config.max_position_embeddings}")
    torch.manual_seed(0)
    lora = peft.LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = peft.get_peft_model(LlamaForCausalLM(config), lora)
    input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    name = f"llama {config.num_hidden_layers}×{config.hidden_size} LoRA r={args.lora_r}"
    description = (
        f"LlamaForCausalLM ({config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
        f"{config.intermediate_size}, {config.num_attention_heads} heads, vocabulary {config.vocab_size}), LoRA "
        f"r={args.lora_r} on {','.join(LORA_TARGET_MODULES)}: {trainable:,} of {total:,} parameters train; "
        f"batch {args.batch_size} × {args.seq_len} tokens, AdamW"
    )
    return Workload(name, model, input_ids, input_ids, causal_lm_loss, "adamw", description)


class Config:
    """
    One model with a prefix frozen by LayerFreezer, ready to step. `loss(model, x, y)` computes the loss of a step
    (default: cross-entropy of `model(x)` against classes `y`); `optimizer` is `"sgd"` (momentum) or `"adamw"`, over
    the parameters that train.
    """

    def __init__(
        self,
        base: torch.nn.Module,
        fraction: float,
        args,
        attach_freezer: bool = True,
        freeze_start: float = 0.0,
        schedule: str = "linear",
        loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = classification_loss,
        optimizer: str = "sgd",
    ):
        self.fraction = fraction
        self.model = copy.deepcopy(base).to(args.device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        else:
            self.optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)
        self.loss_fn = loss
        self.freezer = None
        self.frozen_units = 0
        if attach_freezer:
            self.freezer = LayerFreezer(
                self.model, self.optimizer, freeze_start=freeze_start, freeze_level=1.0, schedule=schedule
            )
            # what the freezer froze: it stops short of emptying the optimizer (a LoRA model's last adapter)
            count = num_units_to_freeze(fraction, self.freezer.num_units)
            self.frozen_units = self.freezer.freeze_units(count).frozen_units
        self.args = args

    @classmethod
    def of(cls, workload: Workload, fraction: float, args, **kwargs) -> Config:
        return cls(workload.base, fraction, args, loss=workload.loss, optimizer=workload.optimizer, **kwargs)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.args.device, dtype=torch.bfloat16, enabled=self.args.bf16):
            return self.loss_fn(self.model, x, y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = self.loss(x, y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_flops(config: Config, x, y) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        config.step(x, y)
    return counter.get_total_flops()


def saved_bytes(config: Config, x, y) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = config.loss(x, y)
    loss.backward()
    config.optimizer.zero_grad(set_to_none=True)
    return total


def time_interleaved(configs: list[Config], x, y, repeats: int, warmup: int) -> list[float]:
    times: list[list[float]] = [[] for _ in configs]
    for rep in range(warmup + repeats):
        for index, config in enumerate(configs):
            synchronize(config.args.device)
            start = time.perf_counter()
            config.step(x, y)
            synchronize(config.args.device)
            if rep >= warmup:
                times[index].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench_model(workload: Workload, args) -> dict:
    base, x, y = workload.base, workload.x, workload.y
    configs = [Config.of(workload, f, args) for f in args.fractions]
    units = configs[0].freezer.units
    # The library's own attribution (the one `plan` and budget="flops" use): FLOPs of each unit, in unit order.
    unit_fwd = profile_units(copy.deepcopy(base).to(args.device), freezable_units(base), x).forward_flops
    fwd_total = sum(unit_fwd)
    total_params = sum(p.numel() for p in base.parameters() if p.requires_grad)  # with LoRA: the adapters
    flops = [step_flops(c, x, y) for c in configs]
    memory = [saved_bytes(c, x, y) for c in configs]
    medians = time_interleaved(configs, x, y, args.repeats, args.warmup)

    # Overhead: an attached freezer with nothing frozen, against no freezer at all; and the adaptive schedule's
    # gradient-norm tracking (an optimizer step pre-hook), which runs at every step.
    plain = Config.of(workload, 0.0, args, attach_freezer=False)
    attached = Config.of(workload, 0.0, args)
    adaptive = Config.of(workload, 0.0, args, schedule="adaptive")
    plain_t, attached_t, adaptive_t = time_interleaved([plain, attached, adaptive], x, y, args.repeats, args.warmup)
    # The tracking itself, timed alone on real gradients (the step-time difference above is within the noise).
    adaptive.loss(x, y).backward()
    tracking = []
    for _ in range(args.repeats):
        synchronize(args.device)
        start = time.perf_counter()
        adaptive.freezer.gradient_norms._record(adaptive.optimizer, (), {})
        synchronize(args.device)
        tracking.append(time.perf_counter() - start)
    adaptive.optimizer.zero_grad(set_to_none=True)
    tracking_t = statistics.median(tracking)

    rows = []
    for config, step_flop, mem, median in zip(configs, flops, memory, medians, strict=True):
        k = config.frozen_units
        ideal = flops[0] / step_flop
        measured = medians[0] / median
        ideal_saving = 1 - step_flop / flops[0]
        measured_saving = 1 - median / medians[0]
        rows.append(
            {
                "fraction": config.fraction,
                "frozen_units": k,
                "num_units": len(units),
                "step_ms": median * 1e3,
                "ideal_speedup": ideal,
                "measured_speedup": measured,
                "efficiency": measured_saving / ideal_saving if ideal_saving > 1e-9 else None,
                "forward_flops_frozen": sum(unit_fwd[:k]) / fwd_total,
                "params_frozen": sum(u.numel for u in units[:k]) / total_params,
                "saved_for_backward_mb": mem / 2**20,
            }
        )
    return {
        "model": workload.name,
        "built": workload.description,
        "rows": rows,
        "overhead": {
            "no_freezer_ms": plain_t * 1e3,
            "freezer_attached_ms": attached_t * 1e3,
            "overhead": attached_t / plain_t - 1,
            "adaptive_attached_ms": adaptive_t * 1e3,
            "adaptive_overhead": adaptive_t / plain_t - 1,
            "gradient_norm_tracking_ms": tracking_t * 1e3,
            "gradient_norm_tracking_share": tracking_t / plain_t,
        },
    }


def bench_compiled_model(workload: Workload, args) -> dict:
    """One compiled model frozen further at each fraction (a freeze event each), beside an eager copy."""
    name, x, y = workload.name, workload.x, workload.y
    torch._dynamo.reset()
    eager = Config.of(workload, 0.0, args)
    compiled = Config.of(workload, 0.0, args, attach_freezer=False)
    compiled.model = torch.compile(compiled.model, backend=args.compile_backend)
    compiled.freezer = LayerFreezer(compiled.model, compiled.optimizer, freeze_start=0.0, max_freeze_events=None)
    rows = []
    for fraction in args.fractions:
        count = num_units_to_freeze(fraction, compiled.freezer.num_units)
        for config in (eager, compiled):
            config.fraction, config.frozen_units = fraction, config.freezer.freeze_units(count).frozen_units
        count = compiled.frozen_units  # short of the target where it would empty the optimizer
        synchronize(args.device)
        start = time.perf_counter()
        compiled.step(x, y)  # traces and compiles the graph for this frozen set
        synchronize(args.device)
        first_step = time.perf_counter() - start
        eager_t, compiled_t = time_interleaved([eager, compiled], x, y, args.repeats, args.warmup)
        rows.append(
            {
                "fraction": fraction,
                "frozen_units": count,
                "num_units": compiled.freezer.num_units,
                "eager_ms": eager_t * 1e3,
                "compiled_ms": compiled_t * 1e3,
                "recompile_s": first_step - compiled_t,
            }
        )
        print(f"  {name} f={fraction:.2f}: compiled {compiled_t * 1e3:.1f} ms, eager {eager_t * 1e3:.1f} ms, "
              f"compile {first_step - compiled_t:.1f} s", file=sys.stderr)  # fmt: skip
    unfrozen = rows[0]["compiled_ms"]
    for row in rows:
        row["compiled_vs_compiled_unfrozen"] = row["compiled_ms"] / unfrozen
        row["compiled_vs_eager"] = row["compiled_ms"] / row["eager_ms"]
    return {"model": name, "built": workload.description, "compile_backend": args.compile_backend, "rows": rows}


def markdown_compiled(results: list[dict]) -> str:
    lines = [
        "| model | f | units frozen | eager step (ms) | compiled step (ms) | compiled / compiled unfrozen "
        "| compiled / eager at this f | recompile (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for r in result["rows"]:
            lines.append(
                f"| {result['model']} | {r['fraction']:.2f} | {r['frozen_units']}/{r['num_units']} "
                f"| {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['compiled_vs_compiled_unfrozen']:.2f} "
                f"| {r['compiled_vs_eager']:.2f} | {r['recompile_s']:.1f} |"
            )
    return "\n".join(lines)


def plot_compiled(results: list[dict], path: Path) -> None:
    series = [("eager_ms", "eager", "o-"), ("compiled_ms", "compiled", "o-")]
    plot_rows(results, path, series, ylabel="step (ms)", ylim=(0, None))


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | f | units frozen | step (ms) | ideal speedup | measured | efficiency | fwd FLOPs frozen "
        "| trainable params frozen | saved for backward (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for r in result["rows"]:
            eff = "—" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
            units = f"{r['frozen_units']}/{r['num_units']}"
            lines.append(
                f"| {result['model']} | {r['fraction']:.2f} | {units} | {r['step_ms']:.1f} "
                f"| {r['ideal_speedup']:.2f}× | {r['measured_speedup']:.2f}× | {eff} "
                f"| {r['forward_flops_frozen']:.0%} | {r['params_frozen']:.0%} | {r['saved_for_backward_mb']:.1f} |"
            )
    lines.append("")
    lines.append(
        "| model | step, no freezer (ms) | freezer attached, nothing frozen (ms) | overhead "
        "| adaptive schedule attached (ms) | overhead | its gradient-norm tracking alone (ms, share of step) |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        o = result["overhead"]
        lines.append(
            f"| {result['model']} | {o['no_freezer_ms']:.1f} | {o['freezer_attached_ms']:.1f} | {o['overhead']:+.1%} "
            f"| {o['adaptive_attached_ms']:.1f} | {o['adaptive_overhead']:+.1%} "
            f"| {o['gradient_norm_tracking_ms']:.2f} ({o['gradient_norm_tracking_share']:.2%}) |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    series = [("ideal_speedup", "FLOP ideal", "o--"), ("measured_speedup", "measured", "o-")]
    plot_rows(results, path, series, ylabel="step speedup")


def plot_rows(results: list[dict], path: Path, series: list[tuple[str, str, str]], ylabel: str, ylim=None) -> None:
    """One panel per model: each (row key, label, line style) of `series` against the frozen fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        fractions = [r["fraction"] for r in result["rows"]]
        for key, label, style in series:
            axis.plot(fractions, [r[key] for r in result["rows"]], style, label=label)
        axis.set(title=result["model"], xlabel="fraction of units frozen", ylabel=ylabel, ylim=ylim)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help=f"timm models (default: {' '.join(MODELS)})")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--batch-size", type=int, help="images (default 32) or, with --lora, sequences (default 8, on cuda 16)"
    )
    parser.add_argument("--lora", action="store_true", help="a Llama causal LM with LoRA adapters, not timm models")
    parser.add_argument("--seq-len", type=int, help="--lora: tokens per sequence (default 128, on cuda 512)")
    parser.add_argument("--lora-r", type=int, default=8, help="--lora: LoRA rank (default 8)")
    parser.add_argument(
        "--config-overrides", help="--lora: LlamaConfig values over the device's default, e.g. num_hidden_layers=4"
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default on cuda)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format (default on cuda)")
    parser.add_argument("--quick", action="store_true", help="resnet18 only, fewer repetitions")
    parser.add_argument("--compile", action="store_true", help="torch.compile: compiled against eager per fraction")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.fractions[0] != 0.0:
        parser.error("--fractions must start with 0 (the reference)")
    if args.lora and args.models:
        parser.error("--models names timm models; --lora measures its Llama (change it with --config-overrides)")
    if not args.lora:
        for option in ("seq_len", "config_overrides"):
            if getattr(args, option) is not None:
                parser.error(f"--{option.replace('_', '-')} needs --lora")
    if args.lora_r < 1:
        parser.error(f"--lora-r must be a positive integer, got {args.lora_r}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
        args.bf16 = True
        args.channels_last = not args.lora  # a memory format for images
        torch.backends.cudnn.benchmark = True
    if args.lora:
        default_batch, default_seq = LORA_BATCH[args.device]
        args.batch_size = args.batch_size or default_batch
        args.seq_len = args.seq_len or default_seq
    else:
        args.batch_size = args.batch_size or 32
        args.models = args.models or list(MODELS)
    if args.quick:
        if not args.lora:
            args.models = ["resnet18"]
        args.repeats = min(args.repeats, 8)
        args.warmup = min(args.warmup, 2)

    results = []
    for name in ["lora"] if args.lora else args.models:
        start = time.perf_counter()
        try:
            workload = lora_workload(args) if args.lora else timm_workload(name, args)
        except ValueError as error:
            parser.error(str(error))
        results.append(bench_compiled_model(workload, args) if args.compile else bench_model(workload, args))
        del workload
        print(f"{results[-1]['model']}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    machine = {
        "date": date.today().isoformat(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"step_speed_{'compiled_' if args.compile else ''}{'lora_' if args.lora else ''}{args.device}"
    (output_dir / f"{stem}.json").write_text(
        json.dumps({"args": vars(args), "machine": machine, "results": results}, indent=2)
    )
    (plot_compiled if args.compile else plot)(results, output_dir / f"{stem}.png")
    inputs = results[0]["built"] if args.lora else f"batch {args.batch_size} at {args.image_size} px"
    print(f"\n{machine}\n{inputs}, bf16={args.bf16}\n")
    print(markdown_compiled(results) if args.compile else markdown(results))
    print(f"\nwrote {output_dir / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
