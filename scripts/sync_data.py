#!/usr/bin/env python3
"""Copies the material the tests and tools read into the repository, and keeps its manifest.

    python scripts/sync_data.py                 # copy from ../shared, rewrite the manifest
    python scripts/sync_data.py --check         # only list what is new or changed there
    python scripts/sync_data.py --src DIR       # another copy of the shared material

What goes where (see tests/data/README.md for the origin and licence of each):
    <src>/fixtures/official/**  ->  tests/data/official/     outputs of the official PIIP code
    <src>/paper/*               ->  bench/data/paper/        the papers' configs, costs, results, tables
    <src>/shapes.md             ->  bench/data/shapes.md     the kernel shapes and published kernel timings

tests/data/MANIFEST.sha256 lists every copied file with its SHA-256, and keeps the entries of
files the repository made itself (tests/data/README.md says which); tests/test_data.py
fails when a listed file is missing or differs, or when a file is not listed. Nothing in
the project reads <src> at run or test time.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "tests" / "data" / "MANIFEST.sha256"
# (source folder or file relative to <src>, destination relative to the repository)
MAPPING = [
    ("fixtures/official", "tests/data/official"),
    ("paper", "bench/data/paper"),
    ("shapes.md", "bench/data/shapes.md"),
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pairs(src: Path) -> list[tuple[Path, Path]]:
    """(source file, destination file) for everything the mapping covers."""
    out = []
    for rel_src, rel_dst in MAPPING:
        s, d = src / rel_src, ROOT / rel_dst
        if s.is_file():
            out.append((s, d))
        elif s.is_dir():
            out += [(f, d / f.relative_to(s)) for f in sorted(s.rglob("*")) if f.is_file()]
        else:
            raise SystemExit(f"sync_data: {s} not found (is --src the shared material?)")
    return out


def read_manifest() -> dict[str, str]:
    """{repository-relative path: sha256} of the committed copy."""
    if not MANIFEST.exists():
        return {}
    entries = {}
    for line in MANIFEST.read_text().splitlines():
        digest, rel = line.split(None, 1)
        entries[rel] = digest
    return entries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=ROOT.parent / "shared", help="the shared material (default ../shared)")
    p.add_argument("--check", action="store_true", help="list new and changed files, copy nothing")
    args = p.parse_args(argv)
    old = read_manifest()
    todo = pairs(args.src)
    changed, digests = [], []
    for s, d in todo:
        rel = d.relative_to(ROOT).as_posix()
        digest = sha256(s)
        digests.append(digest)
        if old.get(rel) != digest or not d.exists():
            changed.append((s, d, rel, digest, "new" if rel not in old else "changed"))
    for _, _, rel, _, what in changed:
        print(f"{what:8s} {rel}")
    if not changed:
        print(f"sync_data: the {len(todo)} files are up to date")
    if args.check:
        return 1 if changed else 0
    for s, d, *_ in changed:
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, d)
    # The copies are byte for byte their sources: the digests computed above are theirs.
    lines = [f"{digest}  {d.relative_to(ROOT).as_posix()}" for (_, d), digest in zip(todo, digests)]
    # Files the repository made itself (not copies: say the official optimizer groups) keep
    # their entries, with the digest they were committed with.
    copied = {d.relative_to(ROOT).as_posix() for _, d in todo}
    own = {rel: digest for rel, digest in old.items() if rel not in copied and (ROOT / rel).exists()}
    lines += [f"{digest}  {rel}" for rel, digest in own.items()]
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text("\n".join(sorted(lines, key=lambda l: l.split(None, 1)[1])) + "\n")
    print(f"sync_data: {len(changed)} copied, {len(own)} of the repository's own kept, manifest lists {len(lines)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
