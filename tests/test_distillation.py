"""Criterion qat_distillation: CE + KL(teacher||student) + hidden MSE, frozen teacher, audio-only utterances."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

import fairseq  # noqa: F401
import fairseq_qasr  # noqa: F401
from fairseq.sequence_generator import SequenceGenerator
from fairseq_cli_helpers import run_fairseq, train_args
from fairseq_qasr.criterions.distill_losses import greedy_transcripts, kl_teacher_student
from fairseq_qasr.criterions.qat_distillation import QATDistillationCriterion, TeacherMismatch
from fairseq_qasr.tasks.librispeech_asr import LibriSpeechASRConfig, LibriSpeechASRTask


@pytest.fixture(scope="module")
def teacher(prepared_sample: Path, tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("teacher")
    run_fairseq("train", train_args(prepared_sample, save_dir, max_update=3))
    return save_dir / "checkpoint_last.pt"


def distill_args(data: Path, save_dir: Path, teacher: Path, extra=()):
    args = train_args(data, save_dir, max_update=3, extra=["--train-subset", "train-clean-5,train-clean-100",
                                                          "--unlabeled", "keep", *extra])
    i = args.index("--criterion")
    args[i + 1:i + 4] = ["qat_distillation", "--teacher-path", str(teacher)]  # replaces CE and its smoothing
    return args


def test_fairseq_train_distills_on_labeled_and_audio_only_utterances(prepared_sample: Path, teacher: Path, tmp_path: Path):
    proc = run_fairseq("train", distill_args(prepared_sample, tmp_path, teacher,
                                             ["--gamma", "0.5", "--hidden-layers", "encoder.2,decoder.1", "--temperature", "2"]))
    log = proc.stdout + proc.stderr
    lines = re.findall(r"train_inner .*", log)
    assert len(lines) == 3
    for line in lines:  # every term is logged separately
        for term in ("ce_loss", "kl_loss", "mse_loss", "labeled_frac"):
            assert re.search(rf"\b{term}=[\d.]+", line), (term, line)
    # the audio-only split was used: some batch is not fully labeled
    fracs = [float(x) for x in re.findall(r"labeled_frac=([\d.]+)", log)]
    assert min(fracs) < 1.0
    # the teacher is not stored in the student's checkpoints
    state = torch.load(tmp_path / "checkpoint_last.pt")
    assert state["criterion"] is None


def test_teacher_with_another_dictionary_is_refused_at_start(prepared_sample: Path, teacher: Path, tmp_path: Path):
    other = tmp_path / "other"
    shutil.copytree(prepared_sample, other)
    with open(other / "dict.txt", "a") as f:
        f.write("EXTRA_PIECE 1\n")
    proc = run_fairseq("train", distill_args(other, tmp_path / "ck", teacher), check=False)
    assert proc.returncode != 0
    assert re.search(r"TeacherMismatch: teacher .* predicts \d+ token types but the task's dictionary has \d+",
                     proc.stderr), proc.stderr[-2000:]
    assert "num_updates=" not in proc.stdout + proc.stderr  # refused before the first update


def _task_and_batch(data: Path):
    task = LibriSpeechASRTask.setup_task(LibriSpeechASRConfig(data=str(data), unlabeled="keep"))
    task.load_dataset("train-clean-5,train-clean-100")
    ds = task.dataset("train-clean-5,train-clean-100")
    idx = [0, 1, len(ds) - 1, len(ds) - 2]  # two labeled, two audio-only
    return task, ds.collater([ds[i] for i in idx])


def test_loss_is_weighted_sum_and_teacher_stays_frozen(prepared_sample: Path, teacher: Path):
    from fairseq import checkpoint_utils

    task, batch = _task_and_batch(prepared_sample)
    assert batch["labeled"].tolist() == [True, True, False, False]
    student = checkpoint_utils.load_model_ensemble([str(teacher)], task=task)[0][0]
    crit = QATDistillationCriterion(task, str(teacher), alpha=0.3, beta=0.7, gamma=0.2, temperature=2.0,
                                    label_smoothing=0.1, hidden_layers="encoder.1,decoder.2", teacher_max_len=30)
    before = [p.clone() for p in crit.teacher.parameters()]
    student.train()
    loss, sample_size, log = crit(student, batch)
    loss.backward()
    assert torch.allclose(loss, 0.3 * log["ce_loss"] + 0.7 * log["kl_loss"] + 0.2 * log["mse_loss"])
    assert not crit.teacher.training and all(p.grad is None and not p.requires_grad for p in crit.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, crit.teacher.parameters()))
    assert "teacher" not in dict(crit.named_modules())  # not a submodule: not saved, not trained
    # the student distilled from itself (same weights, eval mode) has zero KL and MSE
    student.eval()
    _, _, log = crit(student, batch)
    assert float(log["kl_loss"]) < 1e-6 and float(log["mse_loss"]) < 1e-9
    # CE counts only labeled rows; KL covers every row (audio-only rows on the teacher's transcript)
    assert log["ce_ntokens"] < log["ntokens"]


def test_teacher_targets_mode_trains_on_the_teachers_transcripts(prepared_sample: Path, teacher: Path):
    from fairseq import checkpoint_utils

    task, batch = _task_and_batch(prepared_sample)
    student = checkpoint_utils.load_model_ensemble([str(teacher)], task=task)[0][0].eval()
    crit = QATDistillationCriterion(task, str(teacher), alpha=1.0, beta=1.0, gamma=0.0, temperature=1.0,
                                    label_smoothing=0.0, hidden_layers="", teacher_max_len=30,
                                    distill_targets="teacher")
    _, _, log = crit(student, batch)
    d = task.target_dictionary
    net = batch["net_input"]
    hyps = greedy_transcripts(crit.teacher, net["src_tokens"], net["src_lengths"], d.eos(), d.eos(), d.pad(), max_len=30)
    assert log["ntokens"] == int(hyps.ne(d.pad()).sum())  # every row on the teacher's transcript ...
    assert log["ce_ntokens"] == log["ntokens"] and log["n_labeled"] == 4  # ... and CE learns all of them
    assert float(log["kl_loss"]) < 1e-6  # the student is the teacher here
    with pytest.raises(ValueError, match="--distill-targets"):
        QATDistillationCriterion(task, str(teacher), 1.0, 1.0, 0.0, 1.0, 0.0, "", 30, distill_targets="gold")
    # the teacher decodes each utterance once: the same batch again is served from the cache, same loss
    assert (crit.transcripts.hits, crit.transcripts.misses) == (0, 4)
    loss2, _, log2 = crit(student, batch)
    assert (crit.transcripts.hits, crit.transcripts.misses) == (4, 4)
    assert log2["ntokens"] == log["ntokens"] and float(log2["loss"]) == float(log["loss"])
    # other features under the same ids (augmentation) are decoded anew
    changed = {**batch, "net_input": {**net, "src_tokens": net["src_tokens"] * 1.5}}
    crit(student, changed)
    assert crit.transcripts.misses == 8


def test_greedy_transcripts_equal_fairseq_beam_1(prepared_sample: Path, teacher: Path):
    from fairseq import checkpoint_utils

    task, batch = _task_and_batch(prepared_sample)
    model = checkpoint_utils.load_model_ensemble([str(teacher)], task=task)[0][0].eval()
    d = task.target_dictionary
    net = batch["net_input"]
    ours = greedy_transcripts(model, net["src_tokens"], net["src_lengths"], d.eos(), d.eos(), d.pad(), max_len=25)
    gen = SequenceGenerator([model], d, beam_size=1, max_len_b=24, max_len_a=0, min_len=1)
    hypos = gen.generate([model], batch)
    for i, h in enumerate(hypos):
        theirs = h[0]["tokens"]
        mine = ours[i][ours[i].ne(d.pad())]
        assert mine.tolist() == theirs.tolist(), i


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    assert float(kl_teacher_student(logits, logits, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_teacher_student(logits, logits.flip(-1), mask, 1.0)) > 0
    with pytest.raises(TeacherMismatch, match="needs --teacher-path"):
        QATDistillationCriterion._load_teacher(None, None, "")
