"""Quantized qtransformer_conv through stock fairseq: PTQ script, QAT with a schedule, audit, distributed QAT."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fairseq_cli_helpers import BIN, REPO_ROOT, run_fairseq, train_args

SCHEDULED = {"version": 1, "name": "w4a8_progressive",
             "defaults": {"weight": {"bits": 8, "signed": True, "symmetric": True, "granularity": "channel",
                                     "observer": "minmax"},
                          "input": {"bits": 8, "signed": True, "symmetric": False, "observer": "moving_average"},
                          "output": None},
             "ops": {"softmax": {"output": {"bits": 8, "signed": False, "symmetric": False, "observer": "minmax"}}},
             "schedule": {"observe_updates": 3, "weight_bits": [[0, 8], [2, 4]]}}


@pytest.fixture(scope="module")
def float_ckpt(prepared_sample: Path, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("fp")
    run_fairseq("train", train_args(prepared_sample, save, max_update=3))
    return save / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "w4a8_progressive.yaml"
    path.write_text(yaml.safe_dump(SCHEDULED))
    return path


def qat_args(data: Path, save: Path, fp: Path, recipe: Path, updates: int, extra=()):
    return train_args(data, save, updates, ["--quant-config", recipe, "--finetune-from-model", fp,
                                            "--lr", "1e-4", *extra])


def audit(ckpt: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fairseq_qasr.audit", "--path", str(ckpt),
                           "--data", str(data / "dev-clean.tsv"), "--max-utts", "2"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_ptq_script_writes_a_checkpoint_that_generate_and_audit_load(prepared_sample, float_ckpt, tmp_path):
    out = tmp_path / "ptq.pt"
    proc = subprocess.run([sys.executable, "scripts/calibrate.py", "--path", str(float_ckpt), "--quant-config", "w8a8",
                           "--data", str(prepared_sample), "--split", "train-clean-100", "--num-utts", "4",
                           "--out", str(out), "--bias-correction"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"recipe w8a8, 4 utterances, .* bias corrected in \d+ layers", proc.stdout)
    gen = run_fairseq("generate", [prepared_sample, "--user-dir", "fairseq_qasr", "--task", "librispeech_asr",
                                   "--gen-subset", "dev-clean", "--path", out, "--scoring", "wer", "--beam", "2",
                                   "--max-tokens", "8000", "--cpu", "--max-len-b", "10", "--num-workers", "0"])
    assert "WER:" in gen.stdout and "quantized with recipe 'w8a8'" in gen.stderr
    result = audit(out, prepared_sample)
    assert result.returncode == 0 and "VERDICT: PASS" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert "log_softmax" in result.stdout  # beam search's normalization is audited too


def test_qat_schedule_lowers_bits_and_checkpoint_rebuilds_at_4_bits(prepared_sample, float_ckpt, recipe_file, tmp_path):
    proc = run_fairseq("train", qat_args(prepared_sample, tmp_path, float_ckpt, recipe_file, 3))
    log = proc.stdout + proc.stderr
    assert "update 2: weight bits -> 4" in log
    result = audit(tmp_path / "checkpoint_last.pt", prepared_sample)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    linear = re.search(r"^linear\s+addmm.*\[(.*)\]$", result.stdout, flags=re.M).group(1)
    assert "int4" in linear and "int8" in linear  # 4-bit weights, 8-bit activations


def _two_ranks(data: Path, save: Path, fp: Path, recipe: Path, extra=()):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        args = qat_args(data, save, fp, recipe, 3, [
            "--distributed-no-spawn", "--distributed-init-method", f"tcp://127.0.0.1:{port}",
            "--distributed-world-size", "2", "--distributed-rank", str(rank), "--device-id", "0",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--quant-check-interval", "1", *extra])
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([str(BIN / "fairseq-train"), *map(str, args)], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.communicate(timeout=400)[0], p.returncode) for p in procs]


def test_distributed_qat_keeps_quantizer_state_identical_across_ranks(prepared_sample, float_ckpt, recipe_file, tmp_path):
    (log0, rc0), (log1, rc1) = _two_ranks(prepared_sample, tmp_path / "synced", float_ckpt, recipe_file)
    assert (rc0, rc1) == (0, 0), log0[-3000:] + log1[-3000:]
    checks = re.findall(r"update (\d+): quantizer state identical on all 2 ranks", log0)
    assert checks == ["0", "1", "2"]  # verified by all-gathering both ranks' quantizer state and weights
    # the check is real: without synchronized observer ranges the ranks drift apart and training stops
    (log0, rc0), (log1, rc1) = _two_ranks(prepared_sample, tmp_path / "unsynced", float_ckpt, recipe_file,
                                          ["--no-quant-sync"])
    assert rc0 != 0 and "quantizer state differs across ranks" in log0 + log1


def test_init_from_takes_architecture_recipe_and_weights_and_saves_standalone(prepared_sample, float_ckpt, tmp_path):
    ptq = tmp_path / "ptq.pt"
    subprocess.run([sys.executable, "scripts/calibrate.py", "--path", str(float_ckpt), "--quant-config", "w4a8",
                    "--data", str(prepared_sample), "--split", "train-clean-5", "--num-utts", "4", "--out", str(ptq)],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    args = train_args(prepared_sample, tmp_path / "qat", 1, ["--lr", "1e-5"])
    args[args.index("--arch") + 1] = "qtransformer_conv"  # paper-size defaults, overridden by the checkpoint
    proc = run_fairseq("train", args + ["--init-from", ptq])
    assert "architecture and weights taken from the checkpoint" in proc.stderr + proc.stdout
    import torch

    state = torch.load(tmp_path / "qat" / "checkpoint_last.pt")
    model_cfg = state["cfg"]["model"]
    get = model_cfg.get if hasattr(model_cfg, "get") else lambda k: getattr(model_cfg, k)
    assert get("init_from") is None and get("encoder_embed_dim") == 64  # the _xs architecture, stand-alone
    assert '"bits": 4' in get("quant_recipe")
    result = audit(tmp_path / "qat" / "checkpoint_last.pt", prepared_sample)
    assert result.returncode == 0 and "int4" in result.stdout


def test_sensitivity_script_ranks_every_quantizer_group(prepared_sample, float_ckpt, tmp_path):
    from fairseq_qasr.ptq import quantize_checkpoint

    out = tmp_path / "ptq.pt"
    quantize_checkpoint(str(float_ckpt), "w8a8", str(prepared_sample), "train-clean-100", str(out), num_utts=2)
    rows_json = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "scripts/sensitivity.py", "--quantized", str(out), "--float",
                           str(float_ckpt), "--data", str(prepared_sample), "--split", "dev-clean", "--num-utts", "2",
                           "--json", str(rows_json)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["group"]: r for r in json.loads(rows_json.read_text())}
    assert "all" in rows and "dec:log_softmax:in_q" in rows and "enc:linear:w_q" in rows
    assert sum(r["quantizers"] for g, r in rows.items() if g != "all") == rows["all"]["quantizers"]
    for r in rows.values():
        assert 0.0 <= r["top1"] <= 1.0 and r["kl"] > -1e-4 and r["tokens"] > 0
    assert rows["all"]["kl"] > 0  # the quantized model's distributions really differ from the float model's
    assert "top-1 agree" in proc.stdout
    # wrong way round is refused with a message, not a stack trace
    bad = subprocess.run([sys.executable, "scripts/sensitivity.py", "--quantized", str(float_ckpt), "--float", str(out),
                          "--data", str(prepared_sample)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "must be a full-precision checkpoint" in bad.stderr


def test_requantize_lowers_a_quantized_checkpoint_from_its_latent_float_weights(prepared_sample, float_ckpt, tmp_path):
    import torch
    from fairseq_qasr.ptq import quantize_checkpoint

    w4 = tmp_path / "w4.pt"
    quantize_checkpoint(str(float_ckpt), "w4a8", str(prepared_sample), "train-clean-5", str(w4), num_utts=2)
    with pytest.raises(ValueError, match=r"already quantized .*\(--requantize\)"):
        quantize_checkpoint(str(w4), "w2a8", str(prepared_sample), "train-clean-5", str(tmp_path / "x.pt"), num_utts=2)
    w2 = tmp_path / "w2.pt"
    quantize_checkpoint(str(w4), "w2a8", str(prepared_sample), "train-clean-5", str(w2), num_utts=2, requantize=True)
    s4, s2, fp = (torch.load(p)["model"] for p in (w4, w2, float_ckpt))
    name = next(k for k in fp if k.endswith("fc1.weight"))
    assert torch.equal(s2[name], s4[name]) and torch.equal(s2[name], fp[name])  # the latent weights carried over
    bits = {int(v) for k, v in s2.items() if k.endswith("w_q.weight.bits") and "fc1" in k}
    assert bits == {2}  # re-quantized at 2 bits, with new ranges
    result = audit(w2, prepared_sample)
    assert result.returncode == 0 and "int2" in result.stdout, result.stdout[-2000:]
