#!/usr/bin/env python3
"""Lists the import cycles between the crate's top-level modules (src/<module>.rs or
src/<module>/), read from `crate::<module>` paths in code (comments and test modules
left out). Exits 1 when there is a cycle that is not in ALLOWED, so CI keeps new ones out.

Usage: scripts/module-cycles.py [--graph]
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
# Cycles tolerated (none: every concern owns its piece of the route document, and
# `routing::spec` composes them).
ALLOWED: list = []


def module_edges():
    edges = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(folder, name)
            top = os.path.relpath(path, ROOT).split(os.sep)[0].removesuffix(".rs")
            if top in ("lib", "main", "fuzzing"):
                continue
            text = open(path, encoding="utf-8").read()
            cut = text.find("#[cfg(test)]\nmod tests")
            if cut != -1:
                text = text[:cut]
            code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
            deps = set(re.findall(r"crate::([a-z_0-9]+)", code)) - {top}
            edges.setdefault(top, set()).update(deps)
    return edges


def cycles(edges):
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main():
    edges = module_edges()
    if "--graph" in sys.argv:
        for k in sorted(edges):
            print(f"{k} -> {', '.join(sorted(edges[k]))}")
    bad = []
    for comp in cycles(edges):
        known = any(comp <= allowed for allowed in ALLOWED)
        print(("known cycle: " if known else "NEW CYCLE: ") + ", ".join(sorted(comp)))
        if not known:
            bad.append(comp)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
