"""Stock fairseq-train -> checkpoint -> fairseq-generate --scoring wer; resume; fairseq-hydra-train + override."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fairseq_cli_helpers import logged_losses, logged_updates, run_fairseq, train_args


@pytest.fixture(scope="module")
def trained(prepared_sample: Path, tmp_path_factory: pytest.TempPathFactory):
    save_dir = tmp_path_factory.mktemp("ckpt")
    proc = run_fairseq("train", train_args(prepared_sample, save_dir, max_update=4))
    return save_dir, proc.stdout + proc.stderr


def test_train_writes_checkpoints_and_logs_losses(trained):
    save_dir, log = trained
    assert (save_dir / "checkpoint_last.pt").is_file() and (save_dir / "checkpoint_best.pt").is_file()
    assert logged_updates(log)[-1] == 4
    losses = logged_losses(log)
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    assert "valid on 'dev-clean' subset" in log


def test_generate_scores_wer_on_every_utterance(trained, prepared_sample: Path):
    save_dir, _ = trained
    proc = run_fairseq("generate", [prepared_sample, "--user-dir", "fairseq_qasr", "--task", "librispeech_asr",
                                    "--gen-subset", "dev-clean", "--path", save_dir / "checkpoint_best.pt",
                                    "--scoring", "wer", "--max-tokens", "8000", "--beam", "2", "--cpu",
                                    "--max-len-b", "20", "--num-workers", "0"])
    match = re.search(r"WER: ([\d.]+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    assert 0.0 <= float(match.group(1)) <= 1000.0
    n_utts = len((prepared_sample / "dev-clean.tsv").read_text().splitlines()) - 1
    # every utterance is decoded and scored (fairseq's own batching drops a partial batch; ours must not)
    assert len(re.findall(r"^T-\d+\t", proc.stdout, flags=re.M)) == n_utts
    assert len(re.findall(r"^H-\d+\t", proc.stdout, flags=re.M)) == n_utts


def test_resume_continues_from_saved_update(trained, prepared_sample: Path):
    save_dir, _ = trained
    proc = run_fairseq("train", train_args(prepared_sample, save_dir, max_update=6))
    log = proc.stdout + proc.stderr
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", log), log[-3000:]
    assert logged_updates(log)[:2] == [5, 6]


def test_hydra_train_with_yaml_and_override(prepared_sample: Path, tmp_path: Path):
    proc = run_fairseq("hydra-train", ["--config-dir", "configs/train", "--config-name", "qtransformer_conv_xs",
                                       f"task.data={prepared_sample}", f"checkpoint.save_dir={tmp_path}",
                                       "optimization.max_update=2", "optimization.lr=[0.005]",
                                       "lr_scheduler.warmup_updates=1", f"hydra.run.dir={tmp_path}/hydra"])
    log = proc.stdout + proc.stderr
    assert logged_updates(log)[-1] == 2
    assert re.search(r"num_updates=1, lr=0\.005\b", log), "the command-line lr override must reach the optimizer"
    # the YAML picks the _xs preset: its size, not the paper-size defaults
    params = int(re.search(r"num\. shared model params: ([\d,]+)", log).group(1).replace(",", ""))
    assert params < 1_000_000
    assert (tmp_path / "checkpoint_last.pt").is_file()
