#!/usr/bin/env python3
"""List import circles between the modules of each crate of the workspace.

Run from the repository root: `python3 scripts/import_cycles.py`. A module is a file under a
crate's `src/` (`foo.rs` or `foo/mod.rs`, `lib.rs`/`main.rs` being the crate root); an edge
A → B is a `use crate::b...` (or `crate::b::` path) in A's text, `#[cfg(test)]` modules
included, comments and doc links not. `lib.rs` re-exporting every module is not an edge (it is the root, not a cycle
member). Exits non-zero if any crate has a circle.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in src.rglob("*.rs"):
        rel = path.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "mod":
            parts = parts[:-1]
        if parts in (["lib"], ["main"]):
            continue
        out["::".join(parts)] = path
    return out


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        # Code only: doc links (`[`crate::x`]`) and comments are not imports.
        text = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("//")
        )
        # `use crate::{a, b::c}` and `crate::a::x` paths.
        targets = set()
        for match in re.finditer(r"crate::\{([^}]*)\}", text):
            for item in match.group(1).split(","):
                item = item.strip()
                if item:
                    targets.add(item.split("::")[0])
        for match in re.finditer(r"crate::([a-z_][a-z0-9_]*)", text):
            targets.add(match.group(1))
        for target in targets:
            # the longest module path this refers to, at top level
            if target in mods and target != name and not name.startswith(target + "::"):
                top = name.split("::")[0]
                if target != top:
                    graph[name].add(target)
    # Fold submodules into their top-level module.
    folded: dict[str, set[str]] = {}
    for name, targets in graph.items():
        top = name.split("::")[0]
        folded.setdefault(top, set()).update(t.split("::")[0] for t in targets if t.split("::")[0] != top)
    return folded


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    found = False
    for manifest in sorted(ROOT.glob("crates/*/Cargo.toml")) + [ROOT / "examples/Cargo.toml"]:
        src = manifest.parent / "src"
        if not src.is_dir():
            continue
        circles = cycles(edges(modules(src)))
        name = manifest.parent.name
        if circles:
            found = True
            for circle in circles:
                print(f"{name}: circle {' <-> '.join(circle)}")
        else:
            print(f"{name}: no import circle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
