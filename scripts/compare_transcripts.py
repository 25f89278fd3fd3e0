#!/usr/bin/env python
"""Compare the transcripts of two fairseq-generate runs utterance by utterance (e.g. the integer engine on an
exported file against the fake-quantized checkpoint it came from).

  python scripts/compare_transcripts.py fake_quant.log engine.log [--show 5]

Exit status 0 when every common utterance is identical and both runs scored the same utterances, else 1.
"""
import argparse
import sys

from fairseq_qasr.transcripts import compare, parse_generate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="fairseq-generate output (stdout or --results-path file)")
    p.add_argument("b")
    p.add_argument("--show", type=int, default=5, help="print this many differing utterances")
    args = p.parse_args()
    (ha, sa), (hb, sb) = parse_generate(args.a), parse_generate(args.b)
    if not ha or not hb:
        sys.exit(f"compare_transcripts: no 'D-' lines in {args.a if not ha else args.b}")
    c = compare(ha, hb)
    print(f"{c.identical} of {c.total} transcripts identical" + (f"; {len(c.only_in_one)} utterances in only one run"
                                                                 if c.only_in_one else ""))
    for s, name in ((sa, args.a), (sb, args.b)):
        print(f"  {name}: {s or 'no score line'}")
    for i, x, y in c.differing[: args.show]:
        print(f"  utt {i}:\n    a: {x}\n    b: {y}")
    return 0 if not c.differing and not c.only_in_one else 1


if __name__ == "__main__":
    sys.exit(main())
