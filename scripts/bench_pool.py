#!/usr/bin/env python
"""Pool the per-round paired encoder ratios of several ``bench_integer.py --json`` runs (same thread count) and
print, for each runtime, the median ratio (its time / the engine's; > 1: the engine is faster), a bootstrap 95 %
interval of that median and in how many rounds the engine was faster.

    python scripts/bench_pool.py bench_t1_a.json bench_t1_b.json bench_t1_c.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fairseq_qasr.integer.profiling import paired_ratios, pooled_ratios  # noqa: E402

ENGINE = "integer_engine_w8a8"


def pool(paths):
    """``(threads, {runtime: pooled_ratios(...)})`` over the runs in ``paths`` (rounds paired by index where a JSON
    written before session 10 lacks ``encoder_ratio_rounds``); a clear error on mixed thread counts."""
    rounds, threads = {}, set()
    for p in paths:
        data = json.loads(Path(p).read_text())
        if ENGINE not in data:
            raise SystemExit(f"{p}: no {ENGINE} entry; not a bench_integer.py --json output")
        threads.add(data.get("threads"))
        engine = data[ENGINE]["encoder_ms_all"]
        for name, r in data.items():
            if isinstance(r, dict) and "encoder_ms_all" in r and name != ENGINE:
                pairs = r.get("encoder_ratio_rounds") or paired_ratios(r["encoder_ms_all"], engine)
                rounds.setdefault(name, []).extend(pairs)
    if len(threads) != 1:
        raise SystemExit(f"runs with different thread counts: {sorted(map(str, threads))}")
    return threads.pop(), {k: pooled_ratios(v) for k, v in rounds.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="bench_integer.py --json outputs")
    args = ap.parse_args(argv)
    threads, res = pool(args.json)
    print(f"{len(args.json)} runs, {threads} thread(s); ratio = runtime's encoder time / engine's (> 1: engine faster)")
    for name, s in res.items():
        print(f"  {name:26s} median x{s['median']:.3f}  95% CI x{s['ci_low']:.3f}-x{s['ci_high']:.3f}  "
              f"engine faster in {s['engine_faster']} of {s['rounds']} rounds")


if __name__ == "__main__":
    main()
