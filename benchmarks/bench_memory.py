#!/usr/bin/env python
"""Step time and peak accelerator memory against freeze depth, with the frozen optimizer state offloaded or not.

    python benchmarks/bench_memory.py                      # on a GPU: Llama-style, hidden 2048, 16 layers, bf16
    python benchmarks/bench_memory.py --out docs/bench/memory_cuda.json
    python benchmarks/bench_memory.py --tiny               # on CPU, tiny sizes, seconds: checks the script runs

A randomly initialized `LlamaForCausalLM` built from `LlamaConfig` (on cuda hidden 2048, 16 layers, intermediate
5504, vocabulary 32000, batch 8 x 512 tokens; `--tiny`: hidden 64, 4 layers, batch 2 x 32), fp32 weights under
`torch.autocast(bfloat16)` (what the Trainer's `bf16=True` does), AdamW over every parameter. For each frozen fraction
f of the decoder layers (0, 0.5, 0.75) and offload off and on, a fresh model takes one unfrozen step (so every
parameter has AdamW state, as in a run that freezes mid-training), then `LayerFreezer(granularity="block")` freezes
the embeddings and the first f of the layers as a static prefix (`freezer.freeze_units(k)`), and the script measures:
the freeze event's time (the offload's copies), the median step time over `--steps` timed steps after `--warmup`,
the peak memory of those steps (`torch.cuda.max_memory_allocated`, reset after the freeze) and the memory held
between steps (`torch.cuda.memory_allocated` after `zero_grad`); and on every device the library's own count of
gradient, optimizer-state and offloaded bytes (`freezer.metrics()`). On CPU there is no peak to read: the table shows
the count only.

Prints a markdown table; `--out` writes JSON (arguments, machine, date, rows).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_layer_freeze import LayerFreezer

SIZES = {
    "full": {
        "config": dict(
            hidden_size=2048,
            num_hidden_layers=16,
            intermediate_size=5504,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
        ),
        "batch": 8,
        "seq": 512,
    },
    "tiny": {
        "config": dict(
            hidden_size=64,
            num_hidden_layers=4,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=256,
        ),
        "batch": 2,
        "seq": 32,
    },
}
MiB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, optimizer, batch: torch.Tensor, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(fraction: float, offload: bool, size: dict, device: torch.device, steps: int, warmup: int) -> dict:
    """One configuration on a fresh model: see the module docstring."""
    torch.manual_seed(0)
    config = LlamaConfig(**size["config"], max_position_embeddings=size["seq"], attn_implementation="sdpa")
    with device:
        model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, config.vocab_size, (size["batch"], size["seq"]), generator=generator).to(device)
        for _ in range(2)
    ]
    _step(model, optimizer, batches[0], device)  # every parameter gets AdamW state before the freeze
    freezer = LayerFreezer(model, optimizer, granularity="block", offload_frozen_state=offload)
    layers = config.num_hidden_layers
    frozen_layers = round(fraction * layers)
    # units: the embeddings, then each decoder layer (then the final norm); the head is never a unit
    count = 1 + frozen_layers if frozen_layers else 0
    _sync(device)
    start = time.perf_counter()
    freezer.freeze_units(count)
    _sync(device)
    event_s = time.perf_counter() - start
    counted = freezer.metrics()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        _step(model, optimizer, batches[index % 2], device)
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    row = {
        "frozen_layers": frozen_layers,
        "layers": layers,
        "fraction": fraction,
        "offload": offload,
        "frozen_units": freezer.frozen_units,
        "step_ms": 1000 * statistics.median(times),
        "tokens_per_s": size["batch"] * size["seq"] / statistics.median(times),
        "event_ms": 1000 * event_s,
        "grad_MiB": counted["layer_freeze/grad_bytes"] / MiB,
        "optimizer_state_MiB": counted["layer_freeze/optimizer_state_bytes"] / MiB,
        "offloaded_state_MiB": counted["layer_freeze/offloaded_state_bytes"] / MiB,
        "peak_MiB": torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else None,
        "between_steps_MiB": torch.cuda.memory_allocated(device) / MiB if device.type == "cuda" else None,
    }
    freezer.unfreeze()
    freezer.close()
    del model, optimizer, freezer, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _table(rows: list[dict]) -> str:
    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}" if value >= 10 else f"{value:.2f}"

    head = (
        "| frozen layers | offload | step ms | tokens/s | freeze event ms | peak MiB | between steps MiB | "
        "grads MiB | state on device MiB | offloaded MiB |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['frozen_layers']}/{r['layers']} | {'on' if r['offload'] else 'off'} | {r['step_ms']:.1f} | "
        f"{r['tokens_per_s']:,.0f} | {r['event_ms']:.1f} | {mib(r['peak_MiB'])} | {mib(r['between_steps_MiB'])} | "
        f"{mib(r['grad_MiB'])} | {mib(r['optimizer_state_MiB'])} | {mib(r['offloaded_state_MiB'])} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (seconds): checks the script runs")
    parser.add_argument("--device", default=None, help="default: cuda if available (never with --tiny), else cpu")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    for fraction in args.fractions:
        if not 0 <= fraction <= 1:
            parser.error(f"--fractions must be in [0, 1], got {fraction}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    size = SIZES["tiny" if args.tiny else "full"]
    steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.tiny:
        torch.set_num_threads(1)
    rows = []
    for fraction in args.fractions:
        for offload in (False, True):
            rows.append(measure(fraction, offload, size, device, steps, warmup))
            print(f"done: {rows[-1]['frozen_layers']}/{rows[-1]['layers']} layers, offload {offload}", file=sys.stderr)
    print(_table(rows))
    if args.out is not None:
        machine = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        payload = {
            "args": {**vars(args), "out": str(args.out)},
            "size": size,
            "date": date.today().isoformat(),
            "machine": machine,
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
