"""Run the stock fairseq command-line tools of this environment as subprocesses (real runs, no mocks)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_fairseq(tool: str, args: Sequence[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``fairseq-<tool>`` from the repository root (so ``--user-dir fairseq_qasr`` resolves)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(BIN / f"fairseq-{tool}"), *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fairseq-{tool} exited {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}")
    return proc


def train_args(data: Path, save_dir: Path, max_update: int, extra: Sequence[str] = ()) -> List[str]:
    """A few updates of the tiny preset on the bundled sample."""
    return [data, "--user-dir", "fairseq_qasr", "--task", "librispeech_asr", "--arch", "qtransformer_conv_xs",
            "--train-subset", "train-clean-5", "--valid-subset", "dev-clean",
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
            "--max-tokens", "8000", "--max-update", str(max_update), "--save-dir", save_dir,
            "--cpu", "--num-workers", "0", "--log-interval", "1", "--log-format", "simple", "--seed", "1", *extra]


def logged_updates(log: str) -> List[int]:
    return [int(m) for m in re.findall(r"num_updates=(\d+)", log)]


def logged_losses(log: str) -> List[float]:
    return [float(m) for m in re.findall(r"train_inner.*? loss=([\d.]+)", log)]
