#!/usr/bin/env python3
"""Lists the import cycles between modules, read from `crate::`, `super::` and `self::`
paths in code (comments and test modules left out). It looks at every level: the crate's
top-level modules (src/<module>.rs or src/<module>/), and inside each module folder the
files and folders beside one another (src/devregistry/api/ is one node among
src/devregistry/'s files, and its own files are looked at in turn). Exits 1 when there is a
cycle that is not in ALLOWED, so CI keeps new ones out.

Usage: scripts/module-cycles.py [--graph]
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
# Cycles tolerated, as (parent module path, set of its child modules). None: every concern
# owns its piece of the route document (`routing::spec` composes them), and http1's client
# hands connections back through its `IdleHome` trait, which the pool implements.
ALLOWED: list = []

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_path(path):
    """`src/a/b.rs` → ("a", "b"); `src/a/mod.rs` → ("a",); `src/lib.rs` → ()."""
    parts = os.path.relpath(path, ROOT).removesuffix(".rs").split(os.sep)
    if parts[-1] == "mod" or (len(parts) == 1 and parts[0] in ("lib", "main")):
        parts = parts[:-1]
    return tuple(parts)


def code_of(path):
    text = open(path, encoding="utf-8").read()
    cut = text.find("#[cfg(test)]\nmod tests")
    if cut != -1:
        text = text[:cut]
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))


def path_trees(code, start):
    """The paths that begin at `start` (just after `crate::` etc.), `{a, b::c}` expanded;
    only their first two segments matter here."""
    out = []
    m = re.match(IDENT, code[start:])
    if m:
        first = m.group(0)
        rest = code[start + m.end():]
        second = re.match(r"::(" + IDENT + ")", rest)
        out.append((first, second.group(1)) if second else (first,))
        return out
    if code[start:start + 1] == "{":
        depth, i, item_start, items = 0, start, start + 1, []
        while i < len(code):
            c = code[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    items.append(code[item_start:i])
                    break
            elif c == "," and depth == 1:
                items.append(code[item_start:i])
                item_start = i + 1
            i += 1
        for item in items:
            item = item.strip()
            name = re.match(IDENT, item)
            if name:
                out.append((name.group(0),))
    return out


def references(mod, code):
    """Absolute module paths (possibly ending in an item name) that `code` refers to."""
    found = set()
    for m in re.finditer(r"\b(crate|super|self)::", code):
        if m.start() > 0 and code[m.start() - 1] == ":":
            continue  # the tail of a longer path, read from its start
        base = list(mod) if m.group(1) != "crate" else []
        if m.group(1) == "super":
            base = base[:-1]
        i = m.end()
        # super::super::…
        while code.startswith("super::", i):
            base = base[:-1]
            i += len("super::")
        for tree in path_trees(code, i):
            found.add(tuple(base) + tree)
    return found


def module_edges():
    """{parent: {child: set(children it uses)}} for every module folder."""
    files = []
    for folder, _, names in os.walk(ROOT):
        files += [os.path.join(folder, n) for n in names if n.endswith(".rs")]
    modules = {module_path(f) for f in files}
    edges = {}
    for f in files:
        mod = module_path(f)
        if os.path.relpath(f, ROOT) in ("main.rs", "fuzzing.rs"):
            continue
        if mod and mod[0] == "fuzzing":
            continue
        for target in references(mod, code_of(f)):
            d = 0
            while d < len(mod) and d < len(target) and mod[d] == target[d]:
                d += 1
            if d == len(mod) or d == len(target):
                continue  # a module using its own children, or a child using its parent
            parent, src, dst = mod[:d], mod[d], target[d]
            if parent + (dst,) not in modules:
                continue  # an item defined in the parent, not a sibling module
            edges.setdefault(parent, {}).setdefault(src, set()).add(dst)
    for m in modules:
        if m:
            edges.setdefault(m[:-1], {}).setdefault(m[-1], set())
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
    levels = module_edges()
    bad = []
    for parent in sorted(levels):
        edges = levels[parent]
        where = "::".join(parent) or "crate"
        if "--graph" in sys.argv:
            for k in sorted(edges):
                if edges[k]:
                    print(f"{where}: {k} -> {', '.join(sorted(edges[k]))}")
        for comp in cycles(edges):
            known = any(
                "::".join(p) == "::".join(parent) and comp <= allowed
                for p, allowed in ((tuple(a.split("::")) if a else (), s) for a, s in ALLOWED)
            )
            print(
                ("known cycle in " if known else "NEW CYCLE in ")
                + f"{where}: "
                + ", ".join(sorted(comp))
            )
            if not known:
                bad.append(comp)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
