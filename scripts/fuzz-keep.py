#!/usr/bin/env python3
"""Cuts a fuzz target's corpus to the few inputs worth committing (run by scripts/fuzz.sh).

Usage: fuzz-keep.py CONTROL_FILE KEEP CORPUS_DIR

CONTROL_FILE is what libFuzzer's set-cover merge (`-set_cover_merge=1 -use_counters=0
-merge_control_file=...`, the step `cargo fuzz cmin` runs) wrote: every input, and for
each every coverage feature it reaches (with counters off, about one per code edge).
Greedy set cover then takes, KEEP times, the input that adds the most features not yet
kept. Those inputs replace CORPUS_DIR's content, named by their SHA-1 as libFuzzer names
them. The corpus is committed and replayed by tests/fuzz_replay.rs: a JSON decoder alone
makes libFuzzer keep hundreds of inputs, one per lexer branch, and the replay needs the
few that reach the most of our checks.
the replay needs the few that reach our own checks.
"""

import hashlib
import os
import shutil
import sys


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    control, keep, corpus = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(control, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    n = int(lines[0])
    paths = lines[2 : 2 + n]
    features = {}
    for line in lines[2 + n :]:
        parts = line.split()
        if parts and parts[0] == "FT":
            features[int(parts[1])] = set(parts[2:])
    total = set().union(*features.values()) if features else set()
    covered = set()
    chosen = []
    for _ in range(keep):
        best = max(
            features,
            key=lambda i: (len(features[i] - covered), -os.path.getsize(paths[i])),
            default=None,
        )
        if best is None or not features[best] - covered:
            break
        chosen.append(best)
        covered |= features.pop(best)
    data = {}
    for i in chosen:
        with open(paths[i], "rb") as f:
            body = f.read()
        data[hashlib.sha1(body).hexdigest()] = body
    shutil.rmtree(corpus, ignore_errors=True)
    os.makedirs(corpus)
    for name, body in data.items():
        with open(os.path.join(corpus, name), "wb") as f:
            f.write(body)
    share = 100.0 * len(covered) / len(total) if total else 100.0
    print(
        f"kept {len(data)} of {n} inputs, reaching {len(covered)} of {len(total)} "
        f"features ({share:.0f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
