#!/usr/bin/env python
"""Where freezing pays: each freezing configuration against the unfrozen baseline's quality-vs-cost curve.

    python benchmarks/bench_finetune.py --threads 2                      # 10 seeds, every task (<= 40 min, 2 cores)
    python benchmarks/bench_finetune.py --quick --threads 1              # a smoke run (< 3 min): settles nothing
    python benchmarks/bench_finetune.py --tasks classify,vision --seeds 0-4 --output-dir benchmarks/results/a

The question (issue 23): does a freezing configuration reach the unfrozen run's quality at less cost, in training
FLOPs and in wall time? The answer is read off the unfrozen baseline as a curve, not a point: per seed, the baseline
runs at 0.25x, 0.5x, 0.75x, 1x, 1.25x and 1.5x of its length S, each with its whole learning-rate schedule (warmup,
cosine to zero) compressed to its length, plus the backbone before fine-tuning at cost 0. For each freezing run,
`finetune_stats.py` interpolates that curve (its running best) to find the baseline cost needed to reach the run's
quality; the **cost ratio** is that cost over the run's own cost (above 1: freezing moved the frontier), censored
(a lower bound, marked >=) when the run beat every baseline length. Also the quality difference at equal cost (the
baseline curve interpolated at the run's cost). Both per seed, paired (the same seed's curve), summarized by the
mean and a two-sided 95% Student-t interval over seeds; no correction for the number of configurations compared.

Tasks (`finetune_tasks.py`; corpora in `finetune_data.py`, backbones in `finetune_backbones.py`, cached under
`--cache-dir`): `pydoc-full`, `pydoc-lora` (domain adaptation of a code LM pretrained here to a held-out plateau, to
English documentation), `classify` (docstrings by package, 12 epochs over a fixed small set), `vision` (digits 5-9 on a
ResNet pretrained on 0-4), `control` (more source code of the pretraining distribution: the positive control).

Configurations (all with `granularity="block"`, `embeddings="merge"` once the library has it, `order="definition"`):
`static-25/50/75` (that share of blocks frozen from the first step: `freeze_start=0`,
`freeze_start_level=freeze_level=x`), `linear-0` and `linear-0.1` (from 0 frozen at `freeze_start` 0 or 0.1 to
`freeze_level=0.75`, the deepest static prefix: the last quarter of blocks and the head always train), `adaptive`
(`freeze_start=0`, `freeze_level=0.75`, `check_every` = half an epoch), each also with `cache_activations=True`.
Until `freeze_start_level` is in the library, a static prefix is `freezer.freeze_units(k)` before the first step
with no update (the run's record says `static_fallback`). Every run is the library's custom-loop path: a
`LayerFreezer` and `update((step + 1) / steps)` after each optimizer step.

With `cache_activations=True` the frozen prefix runs in eval mode (the library's rule): for the ResNet its BatchNorm
layers then normalize with their running statistics, so a cached run's quality may differ from the uncached one's;
the Llama models have no dropout, so there the two train the same.

Measurements: quality after training (the freezer gives the units back first). FLOPs as `finetune_tasks.py` counts
them (meta-device copy per frozen count, cached forwards subtracted). Wall time of the loop alone. Within a seed the
configurations run in an order rotated by the seed (interleaved, so drift hits all alike), with the 1-minute load
average recorded at each run: **read wall times only from a quiet machine** (at 2 threads with other jobs running,
threads spin for cores and a run can take 20x longer). One discarded warm-up run per task comes first. The seed sets
the data order and the new head's or adapters' initialization; the backbones are shared.

Outputs in `--output-dir`: `finetune.json` (every run, with its frozen units run-length encoded, cache counters, load
average; the pretraining curves; the step FLOPs per frozen count; machine and versions; written after each seed) and
`finetune.md` (per task: the configurations' quality, FLOPs, time, cost ratios and quality differences with their
intervals, cache row hit rate, and a generated verdict line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from finetune_backbones import QUICK_LM, CodeLM, DigitsResNet, LMSettings, VisionSettings, versions  # noqa: E402
from finetune_stats import compare_to_curve, format_ratio, t_interval  # noqa: E402
from finetune_tasks import (  # noqa: E402
    HAS_EMBEDDINGS,
    HAS_START_LEVEL,
    UNIT_OPTIONS,
    ClassifySettings,
    ClassifyTask,
    LMTask,
    LMTaskSettings,
    RunSettings,
    Task,
    VisionTask,
    VisionTaskSettings,
)

TASKS = ("pydoc-full", "pydoc-lora", "classify", "vision", "control")
LENGTHS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
FREEZING = ("static-25", "static-50", "static-75", "linear-0", "linear-0.1", "adaptive")
CACHED = tuple(f"{c}+cache" for c in FREEZING)
FINAL_LEVEL = 0.75
WARMUP_STEPS = 5

# (full run, --quick run) per task: see the docstring of finetune_tasks.py and the sizing notes in docs/benchmarks.md.
# Learning rates on the cached backbone, baseline seed 0 at 0.5/1/1.5 S (held-out loss): pydoc-full 1e-3 overfits
# (3.627, 3.623, 3.695), 3e-4 still improves (3.770, 3.672, 3.629); pydoc-lora 1e-2 flat (3.819, 3.776, 3.783), 3e-3
# improves (3.920, 3.847, 3.805); control is flat at 3e-4 (3.173, 3.182, 3.201) and at 1e-4 (3.174, 3.173, 3.174;
# 3.178 before): the pretraining distribution leaves fine-tuning almost nothing to gain. classify and vision: 1e-3.
TASK_SETTINGS: dict[str, tuple[RunSettings, RunSettings]] = {
    "pydoc-full": (RunSettings(steps=32, batch_size=8, lr=3e-4), RunSettings(steps=8, batch_size=8, lr=1e-3)),
    "pydoc-lora": (RunSettings(steps=32, batch_size=8, lr=3e-3), RunSettings(steps=8, batch_size=8, lr=1e-2)),
    "classify": (RunSettings(steps=36, batch_size=16, lr=1e-3), RunSettings(steps=8, batch_size=16, lr=1e-3)),
    "vision": (
        RunSettings(steps=30, batch_size=20, lr=1e-3, weight_decay=0.05),
        RunSettings(steps=8, batch_size=20, lr=1e-3, weight_decay=0.05),
    ),
    "control": (RunSettings(steps=32, batch_size=8, lr=1e-4), RunSettings(steps=8, batch_size=8, lr=1e-3)),
}
# --quick runs these only (three baseline lengths, so the curve interpolates), on 2 seeds: it checks the code paths.
QUICK_CONFIGS = (
    "baseline@0.5",
    "baseline@1",
    "baseline@1.5",
    "static-50",
    "static-50+cache",
    "linear-0.1",
    "adaptive+cache",
)


def baseline_name(length: float) -> str:
    return f"baseline@{length:g}"


def all_configs() -> list[str]:
    return [*(baseline_name(x) for x in LENGTHS), *FREEZING, *CACHED]


def freezing_options(config: str, task: Task) -> tuple[dict[str, Any], int | None]:
    """(`LayerFreezer` options, static units or None): the configuration for `task` (see the module docstring)."""
    base = config.removesuffix("+cache")
    cache = {"cache_activations": True} if config.endswith("+cache") else {}
    if base.startswith("static-"):
        level = int(base.removeprefix("static-")) / 100
        if HAS_START_LEVEL:
            options = {"freeze_start": 0.0, "freeze_start_level": level, "freeze_level": level}
            return {**options, **cache}, None
        return {"freeze_start": 0.0, "freeze_level": level, **cache}, static_fallback_units(task, level)
    if base.startswith("linear-"):
        start = float(base.removeprefix("linear-"))
        options = {"freeze_start": start, "freeze_level": FINAL_LEVEL}
        if HAS_START_LEVEL:
            options["freeze_start_level"] = 0.0
        return {**options, **cache}, None
    if base == "adaptive":
        check = max(1, task.steps_per_epoch // 2)
        options = {"schedule": "adaptive", "freeze_start": 0.0, "freeze_level": FINAL_LEVEL, "check_every": check}
        return {**options, **cache}, None
    raise ValueError(f"unknown configuration {config!r}")


def static_fallback_units(task: Task, level: float) -> int:
    """Units covering `level` of the blocks, the embeddings (or stem) with the first block, on today's units."""
    task.step_flops()  # counts the units, on the meta copy
    names = task._unit_names
    lead = 1 if names and (names[0].endswith("embed_tokens") or names[0] == "") else 0
    blocks = sum(1 for n in names if n.split(".")[-1].isdigit())
    return lead + round(level * blocks)


def run_length_encoded(counts: list[int]) -> list[list[int]]:
    """`[[first step (1-based), units frozen], ...]`, one pair each time the count changes."""
    pairs: list[list[int]] = []
    for step, count in enumerate(counts, start=1):
        if not pairs or pairs[-1][1] != count:
            pairs.append([step, count])
    return pairs


def one_run(task: Task, config: str, seed: int, log) -> dict[str, Any]:
    load = os.getloadavg()[0]
    if config.startswith("baseline@"):
        length = float(config.removeprefix("baseline@"))
        steps, freeze, static = max(1, round(length * task.settings.steps)), None, None
    else:
        steps = task.settings.steps
        freeze, static = freezing_options(config, task)
    result = task.run(steps, seed, freeze, static)
    table = task.step_flops()
    counted = sum(table[k] for k in result.frozen_units_per_step)
    skipped = result.cache.get("total_flops_skipped", result.skipped_flops_fallback)
    record = {
        "task": task.name,
        "config": config,
        "seed": seed,
        "steps": steps,
        "quality": result.quality,
        "train_time_s": result.train_time_s,
        "flops": counted - skipped,
        "flops_without_cache_credit": counted,
        "flops_skipped_by_cache": skipped,
        "flops_skipped_source": "total_flops_skipped" if "total_flops_skipped" in result.cache else (
            "whole-batch hits x prefix forward FLOPs" if result.cache else None),
        "frozen_units": run_length_encoded(result.frozen_units_per_step),
        "num_units": result.num_units,
        "cache": result.cache,
        "cache_row_hit_rate": row_hit_rate(result.cache),
        "freeze_options": freeze,
        "static_fallback": static,
        "load_average_1min": load,
    }  # fmt: skip
    log(
        f"  {task.name:10} seed {seed} {config:18} {steps:4d} steps  {task.quality_name} {result.quality:.4f}  "
        f"{result.train_time_s:6.2f} s  {record['flops'] / 1e12:7.4f} TFLOP  load {load:.1f}"
    )
    return record


def row_hit_rate(cache: dict[str, Any]) -> float | None:
    """Served rows over looked-up rows (the partial-batch counters), else whole-batch hits over lookups."""
    if cache.get("total_rows"):
        return cache["total_rows_served"] / cache["total_rows"]
    if cache.get("total_steps"):
        return cache["total_hits"] / cache["total_steps"]
    return None


def run_seed(task: Task, seed: int, configs: list[str], log) -> list[dict[str, Any]]:
    """Every configuration of one seed, in an order rotated by the seed, and the backbone's quality before."""
    shift = (seed * 5) % len(configs)
    order = configs[shift:] + configs[:shift]
    runs = [one_run(task, config, seed, log) for config in order]
    model = task.model(seed)
    before = task.quality(model)
    runs.append({"task": task.name, "config": "before", "seed": seed, "steps": 0, "quality": before,
                 "train_time_s": 0.0, "flops": 0})  # fmt: skip
    return runs


# ---------------------------------------------------------------------------------------------------------------------
# Report


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def analyse(task: Task, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration: means, and the comparisons with the baseline curve in FLOPs and wall time."""
    mine = [r for r in runs if r["task"] == task.name]
    seeds = sorted({r["seed"] for r in mine})
    curves: dict[str, dict[int, list]] = {"flops": {}, "time": {}}
    for seed in seeds:
        points = [
            r for r in mine if r["seed"] == seed and (r["config"].startswith("baseline@") or r["config"] == "before")
        ]
        curves["flops"][seed] = [(r["flops"], r["quality"]) for r in points]
        curves["time"][seed] = [(r["train_time_s"], r["quality"]) for r in points]
    table: dict[str, Any] = {}
    for config in ["before", *all_configs()]:
        chosen = [r for r in mine if r["config"] == config]
        if not chosen:
            continue
        row: dict[str, Any] = {"n": len(chosen)}
        for key in ("quality", "flops", "train_time_s"):
            row[key] = mean_sd([float(r[key]) for r in chosen])
        rates = [r.get("cache_row_hit_rate") for r in chosen if r.get("cache_row_hit_rate") is not None]
        row["cache_row_hit_rate"] = mean_sd(rates) if rates else None
        row["final_frozen_units"] = sorted({r["frozen_units"][-1][1] for r in chosen if r.get("frozen_units")})
        if config in (*FREEZING, *CACHED) and len(seeds) >= 2:
            for on, key in (("flops", "flops"), ("time", "train_time_s")):
                comparison = compare_to_curve(
                    curves[on], {r["seed"]: (r[key], r["quality"]) for r in chosen}, task.higher_is_better
                )
                row[f"ratio_{on}"] = asdict(comparison.ratio)
                row[f"ratio_{on}_text"] = format_ratio(comparison.ratio)
                row[f"ratio_{on}_per_seed"] = comparison.ratios
                row[f"difference_{on}"] = asdict(comparison.difference) if comparison.difference else None
        table[config] = row
    return {"seeds": seeds, "table": table, "cache": cache_speedups(mine), "verdict": verdict(task, table, len(seeds))}


def cache_speedups(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per cached configuration, paired by seed with the same configuration uncached: the speedup the FLOPs predict
    (uncached FLOPs / cached FLOPs, the cache's skipped forwards credited) and the one measured in wall time."""
    by = {(r["config"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {}
    for config in CACHED:
        plain = config.removesuffix("+cache")
        seeds = sorted(s for (c, s) in by if c == config and (plain, s) in by)
        if len(seeds) < 2:
            continue
        predicted = [by[plain, s]["flops"] / by[config, s]["flops"] for s in seeds]
        measured = [by[plain, s]["train_time_s"] / by[config, s]["train_time_s"] for s in seeds]
        out[config] = {
            "predicted_by_flops": asdict(t_interval(predicted)),
            "measured_in_time": asdict(t_interval(measured)),
            "share_of_predicted_gain": [
                (m - 1) / (p - 1) if p > 1 else None for m, p in zip(measured, predicted, strict=True)
            ],
        }
    return out


def verdict(task: Task, table: dict[str, Any], seeds: int) -> str:
    """One line: the configuration whose wall-time ratio interval lies highest above 1 on both measures, or 'did
    not'."""
    if seeds < 2:
        return f"{task.name}: one seed, no interval: no verdict."
    moved = [
        (c, row) for c, row in table.items()
        if "ratio_time" in row and row["ratio_time"]["low"] > 1 and row["ratio_flops"]["low"] > 1
    ]  # fmt: skip
    if moved:
        config, row = max(moved, key=lambda item: item[1]["ratio_time"]["low"])
        goal = "met" if row["ratio_time"]["mean"] >= 1.5 and row["ratio_flops"]["mean"] >= 1.5 else "not met"
        return (
            f"{task.name}: freezing moved the frontier by {row['ratio_time_text']} in wall time and "
            f"{row['ratio_flops_text']} in FLOPs ({config}; paired 95% t-interval over {seeds} seeds; the issue's "
            f">= 1.5x goal {goal})."
        )
    candidates = [(c, row) for c, row in table.items() if "ratio_time" in row]
    config, row = max(candidates, key=lambda item: item[1]["ratio_time"]["mean"])
    return (
        f"{task.name}: freezing did not move the frontier (no configuration's 95% interval lies above 1 in both "
        f"FLOPs and wall time; best in wall time {config}: {row['ratio_time_text']} in time, "
        f"{row['ratio_flops_text']} in FLOPs; {seeds} seeds)."
    )


def format_quality(value: tuple[float, float], higher: bool) -> str:
    return f"{value[0]:.2%} ± {value[1]:.2%}" if higher else f"{value[0]:.4f} ± {value[1]:.4f}"


def format_difference(d: dict[str, Any] | None, higher: bool) -> str:
    if not d:
        return "—"
    scale, unit = (100, " pp") if higher else (1, "")
    return f"{scale * d['mean']:+.3f}{unit} ({scale * d['low']:+.3f} to {scale * d['high']:+.3f})"


def task_markdown(task: Task, analysis: dict[str, Any], pretraining: dict[str, Any]) -> list[str]:
    higher = task.higher_is_better
    lines = [f"### {task.name}: {task.quality_name} ({'higher' if higher else 'lower'} is better)", ""]
    p = pretraining
    if "curve" in p:
        lines.append(
            f"Backbone: {p['parameters']:,} parameters, pretrained {p['steps']} steps ({p['stop_reason']}) in "
            f"{p['pretrain_time_s']:.0f} s; held-out loss {p['heldout_loss_random_init']:.3f} at random init, "
            f"{p['heldout_loss_pretrained']:.3f} pretrained. Data: {json.dumps(task.data)}."
        )
    else:
        lines.append(
            f"Backbone: {p['parameters']:,} parameters, {p['steps']} steps on digits 0-4, test accuracy "
            f"{p['pretrain_test_accuracy']:.2%}. Data: {json.dumps(task.data)}."
        )
    lines += [
        "",
        f"| configuration | {task.quality_name} | TFLOPs | wall time (s) | cost ratio, FLOPs | cost ratio, time "
        "| quality at equal FLOPs | quality at equal time | cache row hit rate | units frozen at the end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config, row in analysis["table"].items():
        rate = row["cache_row_hit_rate"]
        lines.append(
            f"| {config} | {format_quality(row['quality'], higher)} | {row['flops'][0] / 1e12:.4f} "
            f"| {row['train_time_s'][0]:.2f} ± {row['train_time_s'][1]:.2f} | {row.get('ratio_flops_text', '—')} "
            f"| {row.get('ratio_time_text', '—')} | {format_difference(row.get('difference_flops'), higher)} "
            f"| {format_difference(row.get('difference_time'), higher)} "
            f"| {'—' if rate is None else f'{rate[0]:.1%}'} | {','.join(map(str, row['final_frozen_units'])) or '—'} |"
        )
    if analysis["cache"]:
        lines += [
            "",
            "Activation caching against the same configuration uncached (paired by seed, mean and 95% t-interval):",
            "",
            "| configuration | speedup predicted by FLOPs | speedup measured in wall time |",
            "|---|---:|---:|",
        ]
        for config, c in analysis["cache"].items():
            p, m = c["predicted_by_flops"], c["measured_in_time"]
            lines.append(
                f"| {config} | {p['mean']:.2f}x ({p['low']:.2f}-{p['high']:.2f}) "
                f"| {m['mean']:.2f}x ({m['low']:.2f}-{m['high']:.2f}) |"
            )
    lines += ["", f"**{analysis['verdict']}**", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Main


def build_tasks(names: list[str], quick: bool, quick_backbones: bool = False) -> dict[str, Task]:
    small = quick or quick_backbones
    lm = CodeLM(QUICK_LM if small else LMSettings())
    digits = DigitsResNet(VisionSettings(epochs=3) if small else VisionSettings())
    pick = 1 if quick else 0
    tasks: dict[str, Task] = {}
    for name in names:
        settings = TASK_SETTINGS[name][pick]
        if name in ("pydoc-full", "pydoc-lora"):
            tasks[name] = LMTask(lm, "pydoc", name.removeprefix("pydoc-"), settings, LMTaskSettings())
        elif name == "control":
            tasks[name] = LMTask(lm, "control", "full", settings, LMTaskSettings())
        elif name == "classify":
            tasks[name] = ClassifyTask(lm, settings, ClassifySettings())
        else:
            tasks[name] = VisionTask(digits, settings, VisionTaskSettings())
    return tasks


def parse_seeds(text: str) -> list[int]:
    """`"10"` -> 0..9; `"0-4"` -> 0..4; `"3,7"` -> [3, 7]."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            return list(range(first, last + 1))
        if "," in text:
            return sorted({int(x) for x in text.split(",")})
        return list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be N, A-B or A,B,..., got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, among {', '.join(TASKS)}")
    parser.add_argument("--seeds", type=parse_seeds, help="N (0..N-1), A-B or A,B,...; default 10, 2 with --quick")
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 3 min at 1 thread): settles nothing")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--cache-dir", type=Path, help="the pretrained backbones; default <output-dir>/pretrained")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--quick-backbones", action="store_true",
        help="full-length runs on --quick's barely pretrained backbones: for sizing the run (same cost), not results",
    )  # fmt: skip
    parser.add_argument("--configs", help="comma-separated subset of the configurations (default all)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else list(range(2 if args.quick else 10))
    if not args.seeds:
        parser.error("--seeds: no seed")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        parser.error(f"--tasks must be among {', '.join(TASKS)}, got {','.join(unknown) or 'none'}")
    args.tasks = [t for t in TASKS if t in args.tasks]
    configs = list(QUICK_CONFIGS) if args.quick else all_configs()
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",")]
        bad = [c for c in wanted if c not in configs]
        if bad:
            parser.error(f"--configs must be among {', '.join(configs)}, got {','.join(bad)}")
        configs = [c for c in configs if c in wanted]
    args.configs = configs
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    args.cache_dir = args.cache_dir or args.output_dir / "pretrained"
    return args


def machine_info() -> dict[str, Any]:
    return {
        "date": date.today().isoformat(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_start": os.getloadavg()[0],
        "library_has": {"freeze_start_level": HAS_START_LEVEL, "embeddings": HAS_EMBEDDINGS},
        "unit_options": UNIT_OPTIONS,
        **versions(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, flush=True)

    tasks = build_tasks(args.tasks, args.quick, args.quick_backbones)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, dict[str, float]] = {}
    pretraining: dict[str, Any] = {}
    for name, task in tasks.items():
        start = time.perf_counter()
        pretraining[name] = task.prepare(args.cache_dir, log)
        prepared = time.perf_counter() - start
        task.step_flops()
        start = time.perf_counter()
        task.run(min(WARMUP_STEPS, task.settings.steps), 0, None)  # discarded: first-call allocations
        timing[name] = {"prepare_s": prepared, "warmup_s": time.perf_counter() - start}
    document: dict[str, Any] = {
        "machine": machine_info(),
        "args": {**vars(args), "output_dir": str(args.output_dir), "cache_dir": str(args.cache_dir)},
        "settings": {name: asdict(t.settings) for name, t in tasks.items()},
        "data": {name: t.data for name, t in tasks.items()},
        "pretraining": pretraining,
        "step_flops": {name: t.step_flops() for name, t in tasks.items()},
        "prefix_forward_flops": {name: t.prefix_forward_flops() for name, t in tasks.items()},
        "unit_names": {name: t._unit_names for name, t in tasks.items()},
        "timing": timing,
        "runs": [],
        "complete": False,
    }
    path = args.output_dir / "finetune.json"
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        log(f"seed {seed}")
        for name, task in tasks.items():
            start = time.perf_counter()
            runs += run_seed(task, seed, args.configs, log)
            timing[name][f"seed_{seed}_s"] = time.perf_counter() - start
        document["runs"] = runs
        path.write_text(json.dumps(document, indent=2))  # after each seed: an interrupted run keeps what it did
    caveat = " (--quick: settles nothing)" if args.quick else ""
    machine = document["machine"]
    loads = [r["load_average_1min"] for r in runs if "load_average_1min" in r]
    markdown = [
        f"## Fine-tuning against the unfrozen frontier: {len(args.seeds)} seeds{caveat}",
        "",
        f"{machine['date']}, {machine['processor']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch "
        "threads, "
        f"torch {machine['torch']}, transformers {machine['transformers']}; 1-minute load average during the runs "
        f"{min(loads):.1f}-{max(loads):.1f}. Mean ± sd over seeds; cost ratio = baseline cost to reach the "
        "configuration's quality (interpolated on the baseline's 0.25x-1.5x curve) / its cost, mean (paired 95% "
        "t-interval); >= where a seed beat the 1.5x baseline (censored: lower bounds). Quality at equal cost: the "
        "configuration minus the baseline interpolated at its cost, + favouring freezing (95% t-interval). "
        "Written by `benchmarks/bench_finetune.py`.",
        "",
    ]
    analyses = {}
    for name, task in tasks.items():
        analyses[name] = analyse(task, runs)
        markdown += task_markdown(task, analyses[name], pretraining[name])
    total = time.perf_counter() - started
    markdown.append(
        "Time spent (s): "
        + "; ".join(
            f"{n}: prepare {t['prepare_s']:.0f}, runs {sum(v for k, v in t.items() if k.startswith('seed_')):.0f}"
            for n, t in timing.items()
        )
        + f"; whole benchmark {total:.0f}."
    )
    document.update({"analysis": analyses, "complete": True, "total_s": total})
    path.write_text(json.dumps(document, indent=2))
    (args.output_dir / "finetune.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
    print(f"wrote {path} and finetune.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
