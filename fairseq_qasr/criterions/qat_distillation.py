"""Criterion ``qat_distillation``: loss = alpha * label-smoothed CE (utterances with transcripts)
+ beta * T^2 KL(teacher || student) over the decoder's token distributions at temperature T
+ gamma * MSE between chosen hidden states.

The teacher (``--teacher-path``, a full-precision checkpoint) is frozen, in eval mode, without gradients, on the
student's device, and decoded on the same batch: teacher-forced on the reference, or — for audio-only
utterances (``--unlabeled keep``) — on its own greedy transcript, which then also serves as the student's
decoder input; ``--distill-targets teacher`` uses the teacher's transcript for every utterance. A teacher whose dictionary, input features or hidden sizes do not fit the student is refused
when the criterion is built, before training starts.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq import checkpoint_utils, metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass import FairseqDataclass
from torch import Tensor

from .distill_losses import hidden_mse, kl_teacher_student
from .teacher_targets import TranscriptCache, with_model_transcripts

logger = logging.getLogger(__name__)


class TeacherMismatch(ValueError):
    """The teacher checkpoint does not fit the student or the task."""


@dataclass
class QATDistillationConfig(FairseqDataclass):
    teacher_path: str = field(default="", metadata={"help": "full-precision teacher checkpoint (required)"})
    alpha: float = field(default=1.0, metadata={"help": "weight of the label-smoothed cross-entropy"})
    beta: float = field(default=1.0, metadata={"help": "weight of KL(teacher || student)"})
    gamma: float = field(default=0.0, metadata={"help": "weight of the hidden-state MSE"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature T"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the cross-entropy"})
    hidden_layers: str = field(
        default="", metadata={"help": "comma-separated hidden states for the MSE: encoder.N / decoder.N (N = layer output, 0 = input)"})
    teacher_max_len: int = field(default=200, metadata={"help": "longest teacher transcript for audio-only utterances"})
    distill_targets: str = field(
        default="reference", metadata={"help": "decoder inputs: 'reference' (transcripts where there are any, the "
                                                "teacher's greedy transcript for audio-only utterances) or 'teacher' "
                                                "(the teacher's greedy transcript for every utterance: sequence-level "
                                                "KD, the CE term learns it too; use when the references are written "
                                                "differently from what the teacher outputs, e.g. LibriSpeech's "
                                                "upper case for Whisper)"})


def _parse_layers(spec: str) -> List[Tuple[str, int]]:
    layers = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        side, _, idx = item.partition(".")
        if side not in ("encoder", "decoder") or not idx.isdigit():
            raise ValueError(f"--hidden-layers: {item!r} is not encoder.N or decoder.N")
        layers.append((side, int(idx)))
    return layers


@register_criterion("qat_distillation", dataclass=QATDistillationConfig)
class QATDistillationCriterion(FairseqCriterion):
    def __init__(self, task, teacher_path: str, alpha: float, beta: float, gamma: float, temperature: float,
                 label_smoothing: float, hidden_layers: str, teacher_max_len: int,
                 distill_targets: str = "reference"):
        super().__init__(task)
        if distill_targets not in ("reference", "teacher"):
            raise ValueError(f"--distill-targets must be 'reference' or 'teacher', got {distill_targets!r}")
        self.distill_targets = distill_targets
        self.alpha, self.beta, self.gamma, self.temperature = alpha, beta, gamma, temperature
        self.eps, self.teacher_max_len = label_smoothing, teacher_max_len
        self.layers = _parse_layers(hidden_layers)
        if gamma > 0 and not self.layers:
            raise ValueError("--gamma > 0 needs --hidden-layers (e.g. encoder.4,decoder.2)")
        if temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {temperature}")
        # not a registered submodule: fairseq would save its weights in every checkpoint, hand them to the
        # optimizer's parameter scan and switch it to train mode with the criterion
        object.__setattr__(self, "teacher", self._load_teacher(task, teacher_path))
        self.transcripts = TranscriptCache()  # the teacher is frozen: decode each utterance once

    # -- start-up checks -------------------------------------------------------------------------
    def _load_teacher(self, task, path: str):
        if not path:
            raise TeacherMismatch("qat_distillation needs --teacher-path (a full-precision checkpoint)")
        if not os.path.isfile(path):
            raise TeacherMismatch(f"--teacher-path {path}: no such file")
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
        tcfg = state["cfg"]["model"]
        vocab = len(task.target_dictionary)
        t_vocab = state["model"]["decoder.embed_tokens.weight"].shape[0] if "decoder.embed_tokens.weight" in state["model"] else None
        if t_vocab != vocab:
            raise TeacherMismatch(f"teacher {path} predicts {t_vocab} token types but the task's dictionary has {vocab}: "
                                  "teacher and student must share one dictionary")
        student = getattr(task, "student_model_cfg", None)
        if student is not None:
            for key in ("input_feat_per_channel",) + tuple(f"{side}_embed_dim" for side, _ in self.layers):
                if getattr(tcfg, key, None) != getattr(student, key, None):
                    raise TeacherMismatch(f"teacher {path} has {key}={getattr(tcfg, key, None)} but the student has "
                                          f"{getattr(student, key, None)}")
            for side, idx in self.layers:
                for who, cfg in (("teacher", tcfg), ("student", student)):
                    if idx > getattr(cfg, f"{side}_layers"):
                        raise TeacherMismatch(f"--hidden-layers {side}.{idx}: the {who} has {getattr(cfg, f'{side}_layers')} {side} layers")
        models, _ = checkpoint_utils.load_model_ensemble([path], task=task, strict=True)
        task.student_model_cfg = student  # building the teacher went through task.build_model
        teacher = models[0]
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        logger.info(f"teacher {path}: {sum(p.numel() for p in teacher.parameters()):,} parameters, frozen")
        return teacher

    # -- loss -------------------------------------------------------------------------------------
    def _hidden(self, encoder_out: Dict[str, List[Tensor]], extra: Dict[str, Any]) -> List[Tensor]:
        states = []
        for side, idx in self.layers:
            states.append(encoder_out["encoder_states"][idx] if side == "encoder" else extra["inner_states"][idx])
        return states

    def forward(self, model, sample: Dict[str, Any], reduce: bool = True):
        if next(self.teacher.parameters()).device != sample["target"].device:
            self.teacher.to(sample["target"].device)
        net = sample["net_input"]
        all_rows = torch.ones(sample["target"].size(0), dtype=torch.bool, device=sample["target"].device)
        if self.distill_targets == "teacher":  # every row decoded by the teacher, then treated as labeled
            sample = {**sample, "labeled": ~all_rows}
        want_hidden = self.gamma > 0
        with torch.no_grad():  # one teacher encoder pass serves its transcripts and its distributions
            t_enc = self.teacher.encoder(net["src_tokens"], net["src_lengths"], return_all_hiddens=want_hidden)
            target, prev = with_model_transcripts(self.teacher, sample, self.task.target_dictionary,
                                                  self.teacher_max_len, encoder_out=t_enc, cache=self.transcripts)
            t_logits, t_extra = self.teacher.decoder(prev, encoder_out=t_enc)
        pad = self.padding_idx
        mask = target.ne(pad).float()
        enc = model.encoder(net["src_tokens"], net["src_lengths"], return_all_hiddens=want_hidden)
        logits, extra = model.decoder(prev, encoder_out=enc)

        labeled = all_rows if self.distill_targets == "teacher" else sample.get("labeled", all_rows)
        lprobs = model.get_normalized_probs((logits, extra), log_probs=True)
        ce_target = target.masked_fill(~labeled[:, None], pad)
        ce, nll = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), ce_target.view(-1), self.eps, ignore_index=pad)
        kl = kl_teacher_student(logits, t_logits, mask, self.temperature)
        if want_hidden:
            s_h, t_h = self._hidden(enc, extra), self._hidden(t_enc, t_extra)
            masks = [(~enc["encoder_padding_mask"][0]).float() if side == "encoder" else mask for side, _ in self.layers]
            mse = hidden_mse(s_h, t_h, masks)
        else:
            mse = kl.new_zeros(())
        loss = self.alpha * ce + self.beta * kl + self.gamma * mse
        ntokens = int(mask.sum())
        ce_tokens = int(ce_target.ne(pad).sum())
        logging_output = {
            "loss": loss.data, "ce_loss": ce.data, "nll_loss": nll.data, "kl_loss": kl.data, "mse_loss": mse.data,
            "ntokens": ntokens, "ce_ntokens": ce_tokens, "nsentences": target.size(0), "sample_size": ntokens,
            "n_labeled": int(labeled.sum()),
        }
        return loss, ntokens, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        ntokens, ce_tokens = total("ntokens"), total("ce_ntokens")
        ln2 = torch.log(torch.tensor(2.0)).item()
        metrics.log_scalar("loss", total("loss") / max(ntokens, 1) / ln2, ntokens, round=3)
        metrics.log_scalar("ce_loss", total("ce_loss") / max(ce_tokens, 1) / ln2, ce_tokens, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / max(ce_tokens, 1) / ln2, ce_tokens, round=3)
        metrics.log_scalar("kl_loss", total("kl_loss") / max(ntokens, 1) / ln2, ntokens, round=3)
        metrics.log_scalar("mse_loss", total("mse_loss") / max(ntokens, 1), ntokens, round=4)
        metrics.log_scalar("labeled_frac", total("n_labeled") / max(total("nsentences"), 1), 1, round=2)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
