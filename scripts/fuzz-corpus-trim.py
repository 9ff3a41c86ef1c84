#!/usr/bin/env python3
"""Keeps a committed fuzz corpus small: the hand-written inputs (any file whose name is not
a 40-digit hash: seeds, regressions) and, of the fuzzer's own inputs (hash-named, best
minimised first with `cargo fuzz cmin`), the smallest up to a cap. The replay in
`tests/fuzz_corpus.rs` then takes seconds; the full corpus stays with whoever fuzzes.

Usage: scripts/fuzz-corpus-trim.py [--cap N] fuzz/corpus/<target>...
"""
import os
import re
import sys

HASH = re.compile(r"^[0-9a-f]{40}$")


def trim(folder, cap):
    names = sorted(os.listdir(folder))
    found = [n for n in names if HASH.match(n)]
    found.sort(key=lambda n: (os.path.getsize(os.path.join(folder, n)), n))
    for n in found[cap:]:
        os.remove(os.path.join(folder, n))
    kept = len(names) - max(0, len(found) - cap)
    print(f"{folder}: {len(names)} -> {kept}")


def main(args):
    cap = 300
    if args[:1] == ["--cap"]:
        cap, args = int(args[1]), args[2:]
    for folder in args:
        trim(folder, cap)


if __name__ == "__main__":
    main(sys.argv[1:])
