"""Read the transcripts that ``fairseq-generate`` prints and compare two runs utterance by utterance."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


def parse_generate(path: str) -> Tuple[Dict[int, str], Optional[str]]:
    """``({sample id: detokenized hypothesis}, the final 'Generate ...' score line)`` of a fairseq-generate log."""
    hyps: Dict[int, str] = {}
    score = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("D-"):
                key, _, hyp = line.rstrip("\n").split("\t", 2)
                hyps[int(key[2:])] = hyp
            elif line.startswith("Generate "):
                score = line.strip()
    return hyps, score


@dataclass
class Comparison:
    total: int
    identical: int
    differing: List[Tuple[int, str, str]] = field(default_factory=list)  # (id, a, b)
    only_in_one: List[int] = field(default_factory=list)


def compare(a: Dict[int, str], b: Dict[int, str]) -> Comparison:
    """Utterance-level equality of two sets of hypotheses (the same sample ids expected in both)."""
    common = sorted(set(a) & set(b))
    diff = [(i, a[i], b[i]) for i in common if a[i] != b[i]]
    return Comparison(total=len(common), identical=len(common) - len(diff), differing=diff,
                      only_in_one=sorted(set(a) ^ set(b)))
