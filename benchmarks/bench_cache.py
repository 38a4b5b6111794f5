#!/usr/bin/env python
"""Activation caching's speed in a loop of one's own: off, on without serving, on with half the examples, on with all.

    OMP_NUM_THREADS=1 python benchmarks/bench_cache.py --output benchmarks/results/bench_cache.json

A tiny Llama built from a config (8 layers), trained by a plain loop with a `LayerFreezer` whose first 8 units (the
embeddings and 7 of the 8 layers) are frozen from the first step (`freezer.freeze_units(8)`), on a fixed random token
dataset reshuffled each epoch. Four configurations, each its own model (same initial weights), optimizer and freezer:

- `off`: `cache_activations=False`;
- `none`: caching on with `cache_max_bytes=1`: nothing fits, nothing is served (the cost of a cache that does not
  serve);
- `half`: caching on with a budget that holds half the examples;
- `full`: caching on with a budget that holds them all.

One warm-up epoch each (it fills the caches), then `--repeats` timed epochs per configuration, interleaved (off, none,
half, full, off, ...), so that the machine's load falls on all of them alike; a step's time is the median over
repeats, by the wall clock and by this process's CPU time (`time.process_time()`, which leaves out the time the
process waits for a core on a loaded machine: with `OMP_NUM_THREADS=1` the steadier of the two). The
row hit rate `q` is the share of the timed epochs' rows served from the cache (`total_rows_served / total_rows` where
the cache counts rows; the batch hit rate otherwise). The prediction: with `f` the share of an uncached step that the
frozen prefix's forward costs, `f = 1 - t(full) / t(off)` from the run whose every row is served, a cache serving a
share `q` of the rows should run `1 / (1 - q f)` times as fast as `off`; `observed / predicted` says how much of that
the cache keeps.
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
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers as tf

from hf_layer_freeze import LayerFreezer
from hf_layer_freeze.cache_keys import example_keys

CONFIGS = ("off", "none", "half", "full")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    config = tf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.length,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config)


def entry_bytes(args: argparse.Namespace, ids: torch.Tensor) -> int:
    """What one cached example costs: the cut's output for it (fp32) and its key."""
    keys, _, _ = example_keys((), {"input_ids": ids[:1]})
    return args.length * args.hidden * 4 + len(keys[0])


class Run:
    """One configuration: its model, optimizer, freezer and shuffling, stepped an epoch at a time."""

    def __init__(self, name: str, model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> None:
        self.name, self.model, self.ids, self.args = name, model, ids, args
        budget = {"none": 1, "half": entry_bytes(args, ids) * len(ids) // 2, "full": 2**40}.get(name)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        options = {"cache_activations": budget is not None}
        if budget is not None:
            options["cache_max_bytes"] = budget
        self.freezer = LayerFreezer(model, self.optimizer, granularity="block", **options)
        self.freezer.freeze_units(8)  # the embeddings and 7 of the 8 layers, from the first step
        self.generator = torch.Generator().manual_seed(1)
        self.times: list[float] = []  # wall seconds per step, one figure per timed epoch
        self.cpu_times: list[float] = []  # this process's CPU seconds per step (what the machine's load leaves out)
        self.rows = self.served = self.steps = self.hits = 0

    def epoch(self, timed: bool) -> None:
        cache = self.freezer.activation_cache
        before = self._counts(cache)
        order = torch.randperm(len(self.ids), generator=self.generator)
        self.model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        for first in range(0, len(order), self.args.batch):
            batch = self.ids[order[first : first + self.args.batch]]
            loss = self.model(input_ids=batch, labels=batch).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if timed:
            steps = len(order) // self.args.batch
            self.times.append(elapsed / steps)
            self.cpu_times.append(cpu / steps)
            after = self._counts(cache)
            totals = (self.rows, self.served, self.steps, self.hits)
            self.rows, self.served, self.steps, self.hits = (
                total + a - b for total, a, b in zip(totals, after, before, strict=True)
            )

    @staticmethod
    def _counts(cache) -> tuple[int, int, int, int]:
        if cache is None:
            return 0, 0, 0, 0
        rows = getattr(cache, "total_rows", None)
        if rows is None:  # a cache that counts whole batches only (before partial-batch caching)
            return cache.total_steps, cache.total_hits, cache.total_steps, cache.total_hits
        return rows, cache.total_rows_served, cache.total_steps, cache.total_hits

    @property
    def row_hit_rate(self) -> float:
        return self.served / self.rows if self.rows else 0.0

    def step_time(self, clock: str) -> float:
        """The median over timed epochs of a step's `"wall"` or `"cpu"` seconds."""
        return statistics.median(self.times if clock == "wall" else self.cpu_times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per configuration, interleaved")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    for name in ("examples", "batch", "length", "hidden", "vocab", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    load_before = os.getloadavg()
    ids = torch.randint(0, args.vocab, (args.examples, args.length), generator=torch.Generator().manual_seed(0))
    model = build_model(args)
    runs = [Run(name, copy.deepcopy(model), ids, args) for name in CONFIGS]
    for run in runs:
        run.epoch(timed=False)  # fills the caches
    for _ in range(args.repeats):
        for run in runs:
            run.epoch(timed=True)

    off = next(r for r in runs if r.name == "off")
    full = next(r for r in runs if r.name == "full")
    # the prefix's share of an uncached step, from the run whose every row is served
    prefix_share = {clock: max(0.0, 1 - full.step_time(clock) / off.step_time(clock)) for clock in ("wall", "cpu")}
    rows = []
    for run in runs:
        row = {
            "config": run.name,
            "steps_per_s": 1 / run.step_time("wall"),
            "batch_hit_rate": run.hits / run.steps if run.steps else 0.0,
            "row_hit_rate": run.row_hit_rate,
        }
        for clock in ("wall", "cpu"):
            predicted = 1 / (1 - run.row_hit_rate * prefix_share[clock])
            observed = off.step_time(clock) / run.step_time(clock)
            row[f"{clock}_step_ms"] = 1e3 * run.step_time(clock)
            row[f"{clock}_speedup_observed"] = observed
            row[f"{clock}_speedup_predicted"] = predicted
            row[f"{clock}_observed_over_predicted"] = observed / predicted
        row["epoch_wall_step_ms"] = [1e3 * t for t in run.times]
        row["epoch_cpu_step_ms"] = [1e3 * t for t in run.cpu_times]
        rows.append(row)
    print(
        f"{'config':<6} {'steps/s':>8} {'wall ms':>8} {'cpu ms':>7} {'batch hit':>9} {'row hit':>8} "
        f"{'speedup wall':>12} {'pred':>6} {'speedup cpu':>11} {'pred':>6} {'obs/pred cpu':>12}"
    )
    for row in rows:
        print(
            f"{row['config']:<6} {row['steps_per_s']:8.2f} {row['wall_step_ms']:8.1f} {row['cpu_step_ms']:7.1f} "
            f"{row['batch_hit_rate']:9.3f} {row['row_hit_rate']:8.3f} {row['wall_speedup_observed']:12.3f} "
            f"{row['wall_speedup_predicted']:6.3f} {row['cpu_speedup_observed']:11.3f} "
            f"{row['cpu_speedup_predicted']:6.3f} {row['cpu_observed_over_predicted']:12.3f}"
        )
    print(
        f"prefix share of an uncached step (1 - t(full)/t(off)): wall {prefix_share['wall']:.3f}, "
        f"cpu {prefix_share['cpu']:.3f}"
    )
    print(f"load average (1 min) before and after: {load_before[0]:.2f}, {os.getloadavg()[0]:.2f}")
    if args.output is not None:
        result = {
            "command": "python benchmarks/bench_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "torch": torch.__version__,
                "transformers": tf.__version__,
            },
            "settings": {k: getattr(args, k) for k in ("examples", "batch", "length", "hidden", "vocab", "repeats")},
            "prefix_share": prefix_share,
            "configs": rows,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
