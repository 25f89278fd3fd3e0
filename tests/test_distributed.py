"""Distributed training on CPUs: the silent no-op is refused; two gloo processes really train together."""
from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import fairseq  # noqa: F401
import fairseq_qasr  # noqa: F401
from fairseq_cli_helpers import BIN, REPO_ROOT, run_fairseq, train_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cpu_world_size_2_without_no_spawn_is_refused(prepared_sample: Path, tmp_path: Path):
    args = train_args(prepared_sample, tmp_path, 2, ["--distributed-world-size", "2",
                                                    "--distributed-init-method", f"tcp://127.0.0.1:{free_port()}"])
    proc = run_fairseq("train", args, check=False)
    assert proc.returncode != 0, "fairseq would exit 0 having trained nothing"
    assert "spawns one worker per CUDA device, and there are none" in proc.stderr
    assert "--distributed-no-spawn" in proc.stderr and "--ddp-backend legacy_ddp" in proc.stderr
    assert not (tmp_path / "checkpoint_last.pt").exists()


def test_two_cpu_processes_train_one_model(prepared_sample: Path, tmp_path: Path):
    port = free_port()
    procs = []
    for rank in range(2):
        args = train_args(prepared_sample, tmp_path, 3, [
            "--distributed-no-spawn", "--distributed-init-method", f"tcp://127.0.0.1:{port}",
            "--distributed-world-size", "2", "--distributed-rank", str(rank), "--device-id", "0",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"])
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([str(BIN / "fairseq-train"), *map(str, args)], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "distributed init (rank 1)" in logs[0] + logs[1]
    # rank 0 logs the run: 3 updates, each over both ranks' batches (legacy_ddp all-reduces the gradients)
    updates = [int(u) for u in re.findall(r"num_updates=(\d+)", logs[0])]
    assert updates[-1] == 3
    assert (tmp_path / "checkpoint_last.pt").is_file()
