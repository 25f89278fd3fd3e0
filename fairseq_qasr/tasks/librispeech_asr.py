"""Task ``librispeech_asr``: LibriSpeech manifests (see ``scripts/prepare_librispeech.py``) -> speech recognition.

The data directory holds ``<split>.tsv`` manifests, ``config.yaml`` (features, SpecAugment, BPE), the
dictionary and the BPE model. Several manifests can be joined with commas (``train-clean-100,train-clean-360``).
Splits whose name starts with ``train`` are training splits: shuffled, SpecAugment applied.
"""

import contextlib
import dataclasses
import logging
import os
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import yaml
from fairseq.data import Dictionary, encoders
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import MISSING, OmegaConf, open_dict
from tqdm import tqdm

from fairseq_qasr.data.audio import audio_info, check_sample_rate
from fairseq_qasr.data.errors import DataError
from fairseq_qasr.data.features import build_feature_extractor, build_specaugment
from fairseq_qasr.data.manifest import ManifestRow, read_manifest

from fairseq_qasr.quant.distributed import check_ranks_agree, sync_observer_ranges
from fairseq_qasr.quant import Quantizer, set_observing
from fairseq_qasr.quant.float64 import to_float64

from .speech_dataset import SpeechToTextDataset, encode_targets

logger = logging.getLogger(__name__)

WHISPER_WINDOW_FRAMES = 3000  # Whisper always sees a 30-s window


@dataclass
class LibriSpeechASRConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "prepared data directory (manifests, config.yaml, dictionary)"})
    config_yaml: str = field(default="config.yaml", metadata={"help": "data config file inside the data directory"})
    max_source_positions: int = field(default=6000, metadata={"help": "longest input in 10-ms frames"})
    max_target_positions: int = field(default=1024, metadata={"help": "longest target in tokens"})
    resample_audio: bool = field(default=False, metadata={"help": "resample audio that is not at the config's sample rate instead of rejecting it"})
    unlabeled: ChoiceEnum(["skip", "keep"]) = field(
        default="skip", metadata={"help": "audio-only utterances (empty transcript): skip them, or keep them (target = EOS, labeled=False) for distillation"})
    skip_audio_check: bool = field(default=False, metadata={"help": "do not read every audio header when a split is loaded"})
    no_quant_sync: bool = field(default=False, metadata={
        "help": "distributed QAT: do not all-reduce observer ranges across ranks (they then drift apart)"})
    quant_check_interval: int = field(default=50, metadata={
        "help": "distributed QAT: every N updates verify that all ranks hold the same quantizer state (0: never)"})
    eval_float64: bool = field(default=False, metadata={
        "help": "fairseq-generate: decode the fake-quantized model in float64, i.e. its arithmetic without float32 "
                "rounding on the same integer weights and biases (the integer engine's reference; docs/export.md)"})


def load_data_config(data_dir: str, name: str) -> Dict[str, Any]:
    path = os.path.join(data_dir, name)
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist (run scripts/prepare_librispeech.py first)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: data config not found (written by scripts/prepare_librispeech.py)")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a mapping at the top level")
    return config


def _option_names(cfg: Any) -> List[str]:
    """Option names of a model config, whatever its container (DictConfig, dataclass, Namespace)."""
    if OmegaConf.is_config(cfg):
        names = list(cfg.keys())
    elif dataclasses.is_dataclass(cfg):
        names = [f.name for f in dataclasses.fields(cfg)]
    else:
        names = list(vars(cfg))
    return [n for n in names if not str(n).startswith("_")]


@register_task("librispeech_asr", dataclass=LibriSpeechASRConfig)
class LibriSpeechASRTask(FairseqTask):
    def __init__(self, cfg: LibriSpeechASRConfig, tgt_dict: Dictionary, data_config: Dict[str, Any]):
        super().__init__(cfg)
        self.tgt_dict, self.data_config = tgt_dict, data_config
        self.sample_rate = int(data_config.get("sample_rate", 16000))
        self.features = dict(data_config.get("features") or {"type": "fbank"})
        self.feature_fn = build_feature_extractor(self.features, self.sample_rate)
        self.specaugment = build_specaugment(data_config.get("specaugment"))
        self.bpe = self.build_bpe(None)

    @classmethod
    def setup_task(cls, cfg: LibriSpeechASRConfig, **kwargs) -> "LibriSpeechASRTask":
        data_config = load_data_config(cfg.data, cfg.config_yaml)
        dict_path = os.path.join(cfg.data, data_config.get("vocab_filename", "dict.txt"))
        if not os.path.isfile(dict_path):
            raise DataError(f"{dict_path}: dictionary not found (named by vocab_filename in {cfg.config_yaml})")
        tgt_dict = Dictionary.load(dict_path)
        logger.info(f"dictionary {dict_path}: {len(tgt_dict)} types")
        return cls(cfg, tgt_dict, data_config)

    def _resolve(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.cfg.data, path)

    def build_bpe(self, args):
        spec = dict(self.data_config.get("bpe_tokenizer") or {})
        if not spec:
            return None
        for key in ("sentencepiece_model", "vocab_path"):
            if key in spec:
                spec[key] = self._resolve(spec[key])
        return encoders.build_bpe(Namespace(**spec))

    def _tokenize(self, text: str) -> str:
        return self.bpe.encode(text) if self.bpe is not None else text

    def _read_rows(self, split: str) -> Tuple[List[ManifestRow], List[str]]:
        rows, sources = [], []
        for name in split.split(","):
            path = os.path.join(self.cfg.data, f"{name}.tsv")
            if not os.path.isfile(path):
                have = sorted(f[:-4] for f in os.listdir(self.cfg.data) if f.endswith(".tsv"))
                raise DataError(f"{path}: no manifest for split {name!r}; prepared splits: {', '.join(have) or 'none'}")
            split_rows = read_manifest(path)
            rows += split_rows
            sources += [path] * len(split_rows)
        return rows, sources

    def _check_audio(self, rows: List[ManifestRow], sources: List[str]) -> None:
        """Read every audio header now, so a missing/corrupt/wrong-rate file fails at start-up, naming the
        manifest line, instead of inside a data-loader worker mid-epoch."""
        for row, src in tqdm(list(zip(rows, sources)), desc="checking audio", unit="file", leave=False,
                             disable=len(rows) < 2000):
            where = f"{src}:{row.line}"
            rate, _ = audio_info(row.audio, where=where)
            check_sample_rate(row.audio, rate, self.sample_rate, self.cfg.resample_audio, where=where)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs) -> None:
        rows, sources = self._read_rows(split)
        unlabeled = sum(not r.labeled for r in rows)
        if unlabeled and self.cfg.unlabeled == "skip":
            keep = [i for i, r in enumerate(rows) if r.labeled]
            rows, sources = [rows[i] for i in keep], [sources[i] for i in keep]
            logger.info(f"{split}: skipped {unlabeled} unlabeled (audio-only) utterances; --unlabeled keep feeds them to distillation")
        if not rows:
            raise DataError(f"split {split!r} has no usable utterances ({unlabeled} unlabeled ones skipped; see --unlabeled)")
        if not self.cfg.skip_audio_check:
            self._check_audio(rows, sources)
        is_train = all(name.startswith("train") for name in split.split(","))
        targets = encode_targets(rows, sources, self.tgt_dict, self._tokenize)
        fixed = WHISPER_WINDOW_FRAMES if self.features.get("type") == "whisper" else None
        self.datasets[split] = SpeechToTextDataset(
            rows, sources, targets, self.tgt_dict, self.feature_fn,
            specaugment=self.specaugment if is_train else None, sample_rate=self.sample_rate,
            resample=self.cfg.resample_audio, shuffle=is_train, fixed_frames=fixed)
        logger.info(f"{split}: {len(rows)} utterances ({sum(r.labeled for r in rows)} labeled)")

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """Around fairseq's update: the recipe's QAT schedule, and quantizer state kept equal across ranks."""
        inner = model
        while isinstance(getattr(inner, "module", None), torch.nn.Module):  # DDP / proxy wrappers
            inner = inner.module
        recipe = getattr(inner, "qasr_recipe", None)
        schedule = recipe.schedule if recipe is not None else None
        if schedule is not None:
            for event in schedule.before_update(inner, update_num):
                logger.info(f"update {update_num}: {event}")
        try:
            out = super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        finally:
            if recipe is not None:
                if schedule is not None:
                    schedule.after_backward(inner, update_num)
                if not self.cfg.no_quant_sync:
                    sync_observer_ranges(inner)
                set_observing(inner, False)  # validation and decoding never move the ranges
        interval = self.cfg.quant_check_interval
        if recipe is not None and interval and torch.distributed.is_initialized() and update_num % interval == 0:
            checksum = check_ranks_agree(inner)
            logger.info(f"update {update_num}: quantizer state identical on all {torch.distributed.get_world_size()} "
                        f"ranks (checksum {checksum[0].item():.6f})")
        return out

    def build_model(self, cfg, from_checkpoint: bool = False):
        model = super().build_model(cfg, from_checkpoint)
        effective = getattr(model, "effective_cfg", None)
        if effective is not None and effective is not cfg:
            # fairseq builds dataclass models from a copy of cfg: write back what the model resolved (presets,
            # --init-from, the stored quantization recipe) so that saved checkpoints rebuild this exact model
            with open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext():
                for key in _option_names(effective):
                    setattr(cfg, key, getattr(effective, key))
        self.student_model_cfg = cfg  # read by criteria that check a teacher against the student
        return model

    def build_generator(self, models, args, **kwargs):
        if self.cfg.eval_float64:
            for model in models:
                self._to_float64(model)
        return super().build_generator(models, args, **kwargs)

    def _to_float64(self, model: torch.nn.Module) -> None:
        """--eval-float64: the model in float64 with its float32 integer weights (one recording pass on the first
        utterance of a loaded split)."""
        if not any(isinstance(m, Quantizer) for m in model.modules()):
            raise ValueError("--eval-float64: the model has no quantizers; it takes a fake-quantized checkpoint "
                             "(an exported integer model or a full-precision one has nothing to evaluate in float64)")
        ds = next(iter(self.datasets.values()), None)
        if ds is None:
            raise ValueError("--eval-float64: no split loaded to record the weights on")
        net = ds.collater([ds[0]])["net_input"]
        model.eval()
        to_float64(model, lambda m: m(**net))
        logger.info("--eval-float64: the fake-quantized model runs in float64 (integer weights and biases of float32)")

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        if self.cfg.eval_float64:  # the features in the model's dtype
            net = sample["net_input"]
            sample = dict(sample, net_input=dict(net, src_tokens=net["src_tokens"].double()))
        return super().inference_step(generator, models, sample, prefix_tokens=prefix_tokens, constraints=constraints)

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self) -> Dictionary:
        return self.tgt_dict

    def max_positions(self):
        return self.cfg.max_source_positions, self.cfg.max_target_positions
