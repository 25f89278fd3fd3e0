"""Comparing fairseq-generate transcripts (scripts/compare_transcripts.py)."""
import subprocess
import sys

from fairseq_cli_helpers import REPO_ROOT
from fairseq_qasr.transcripts import compare, parse_generate

LOG = """S-1\tx
T-1\tTHE CAT
H-1\t-0.1\t▁the ▁cat
D-1\t-0.1\tthe cat
D-0\t-0.2\ta dog\twith a tab
Generate dev-clean with beam=1: WER: 10.0
"""


def test_parse_and_compare(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text(LOG)
    b.write_text(LOG.replace("the cat", "the hat").replace("D-0", "D-2"))
    hyps, score = parse_generate(str(a))
    assert hyps == {1: "the cat", 0: "a dog\twith a tab"} and score.startswith("Generate dev-clean")
    c = compare(hyps, parse_generate(str(b))[0])
    assert (c.total, c.identical, c.only_in_one) == (1, 0, [0, 2]) and c.differing == [(1, "the cat", "the hat")]
    same = subprocess.run([sys.executable, "scripts/compare_transcripts.py", str(a), str(a)], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert same.returncode == 0 and "2 of 2 transcripts identical" in same.stdout
    other = subprocess.run([sys.executable, "scripts/compare_transcripts.py", str(a), str(b)], cwd=REPO_ROOT,
                           capture_output=True, text=True)
    assert other.returncode == 1 and "0 of 1 transcripts identical" in other.stdout and "the hat" in other.stdout
