"""Where the integer engine's time goes: per-op self time (``torch.profiler``) of a callable, medians over rounds.

The C kernels are torch ops (``qasr::*``), so the profile names each kernel; everything else (``aten::*`` views,
copies, allocation) is the Python glue around them.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
from torch.profiler import ProfilerActivity, profile


def op_profile(fn: Callable[[], object], rounds: int = 3, pause_s: float = 0.2) -> Dict[str, Dict[str, float]]:
    """``{op: {"ms": median self time per round, "calls": calls per round}}`` plus ``"wall"`` (median wall ms of
    the profiled rounds), after one warm-up call; ``pause_s`` between rounds lets worker threads park."""
    fn()
    per_op: Dict[str, List[float]] = {}
    calls: Dict[str, int] = {}
    walls: List[float] = []
    for _ in range(rounds):
        time.sleep(pause_s)
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        walls.append(1000 * (time.perf_counter() - t))
        for e in prof.key_averages():
            per_op.setdefault(e.key, []).append(e.self_cpu_time_total / 1000)
            calls[e.key] = e.count
    out = {k: {"ms": statistics.median(v + [0.0] * (rounds - len(v))), "calls": calls[k]} for k, v in per_op.items()}
    out["wall"] = {"ms": statistics.median(walls), "calls": 1}
    return out


def format_profile(prof: Dict[str, Dict[str, float]], top: int = 12) -> str:
    """The C kernels, then the largest other ops, then the rest summed, as text lines."""
    wall = prof["wall"]["ms"]
    items = sorted(((k, v) for k, v in prof.items() if k != "wall"), key=lambda kv: -kv[1]["ms"])
    kern = [kv for kv in items if kv[0].startswith("qasr::")]
    other = [kv for kv in items if not kv[0].startswith("qasr::")]
    lines = [f"  wall (profiled) {wall:9.1f} ms"]
    for k, v in kern + other[:top - min(top, len(kern))]:
        lines.append(f"  {k:28s} {v['ms']:9.1f} ms {100 * v['ms'] / wall:5.1f} %  {int(v['calls']):6d} calls")
    rest = sum(v["ms"] for _, v in other[top - min(top, len(kern)):])
    lines.append(f"  {'(other ops)':28s} {rest:9.1f} ms {100 * rest / wall:5.1f} %")
    return "\n".join(lines)


def paired_ratios(other_ms: Sequence[float], engine_ms: Sequence[float]) -> List[float]:
    """Per round, the other runtime's time over the engine's, both timed in that round (the VM's drift between
    rounds cancels in each pair)."""
    return [round(o / e, 3) for o, e in zip(other_ms, engine_ms)]


def pooled_ratios(ratios: Sequence[float], resamples: int = 5000, seed: int = 0) -> Dict[str, float]:
    """Summary of per-round paired speed ratios (other runtime's time / engine's, pooled over benchmark runs):
    median, a percentile-bootstrap 95 % interval of the median (rounds resampled with replacement), and in how many
    rounds the engine was faster (ratio > 1)."""
    if not ratios:
        raise ValueError("pooled_ratios: no rounds")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {"rounds": len(ratios), "median": statistics.median(ratios), "ci_low": meds[int(0.025 * resamples)],
            "ci_high": meds[int(0.975 * resamples) - 1], "engine_faster": sum(r > 1 for r in ratios)}
