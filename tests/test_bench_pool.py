"""scripts/bench_pool.py: per-round speed ratios of several benchmark runs pooled (median, bootstrap interval,
rounds the engine won), on JSON files in bench_integer.py's format."""
import importlib.util
import json
from pathlib import Path

import pytest

from fairseq_qasr.integer.profiling import pooled_ratios

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_pool.py"


def load_cli():
    spec = importlib.util.spec_from_file_location("bench_pool_cli", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_json(path, threads, engine, ort, with_ratios):
    ort_entry = {"encoder_ms": sorted(ort)[len(ort) // 2], "encoder_ms_all": ort}
    if with_ratios:
        ort_entry["encoder_ratio_rounds"] = [round(o / e, 3) for o, e in zip(ort, engine)]
    path.write_text(json.dumps({"threads": threads, "onnxruntime_dynamic_int8": ort_entry,
                                "integer_engine_w8a8": {"encoder_ms": sorted(engine)[len(engine) // 2],
                                                        "encoder_ms_all": engine}}))
    return path


def test_pooled_ratios_median_interval_and_wins():
    s = pooled_ratios([0.9, 1.1, 1.2, 1.3, 1.0])
    assert s["median"] == 1.1 and s["rounds"] == 5 and s["engine_faster"] == 3  # 1.0 is not a win
    assert 0.9 <= s["ci_low"] <= s["median"] <= s["ci_high"] <= 1.3
    assert pooled_ratios([1.2] * 7)["ci_low"] == pooled_ratios([1.2] * 7)["ci_high"] == 1.2
    with pytest.raises(ValueError, match="no rounds"):
        pooled_ratios([])


def test_bench_pool_pools_runs_and_pairs_old_files_by_round(tmp_path, capsys):
    cli = load_cli()
    a = run_json(tmp_path / "a.json", 1, [100, 200, 100], [110, 180, 130], with_ratios=True)
    b = run_json(tmp_path / "b.json", 1, [100, 100], [150, 90], with_ratios=False)  # pre-session-10 file
    threads, res = cli.pool([a, b])
    r = res["onnxruntime_dynamic_int8"]
    assert threads == 1 and r["rounds"] == 5 and r["engine_faster"] == 3 and r["median"] == pytest.approx(1.1)
    cli.main([str(a), str(b)])
    assert "engine faster in 3 of 5 rounds" in capsys.readouterr().out
    c = run_json(tmp_path / "c.json", 2, [100], [120], with_ratios=True)
    with pytest.raises(SystemExit, match="different thread counts"):
        cli.pool([a, c])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a bench_integer.py"):
        cli.pool([tmp_path / "x.json"])
