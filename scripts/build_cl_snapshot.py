#!/usr/bin/env python
"""Build scimtrain's offline Cell Ontology snapshot, ``scimtrain/data/cl_snapshot.json.gz``.

Source. The pinned CL release ``v2026-03-26`` as shipped, pre-digested, by CZI's
``cellxgene-ontology-guide==1.11.1`` (MIT; the CL content itself is CC BY 4.0). Its wheel
holds ``cellxgene_ontology_guide/data/CL-ontology-v2026-03-26.json.zst``: a dict
``{term_id: {"label", "deprecated", "replaced_by"?, "ancestors": {ancestor_id: distance}}}``,
built from CL's classified ``cl.owl`` by following ``is_a`` and ``part_of`` (BFO:0000050)
and keeping only ``CL:`` ancestors. No other relation (develops_from, has_part, ...) is in it.

Which edges the snapshot keeps. A term's parents are its ancestors at distance 1, i.e. its
direct ``is_a`` / ``part_of`` CL parents. A handful of CL terms (cell parts such as
"basophilic cytoplasm") reach ``CL:0000000`` only through GO/UBERON terms that the package
filters out; for those the script adds an edge to the nearest CL ancestors that the direct
parents do not already explain, then checks that the transitive closure of the snapshot's
parents equals the package's ancestor set for every term (the build fails otherwise). Only
CL ids appear: labels in a store are CL ids, and non-CL nodes would only add noise to
"parents".

Deprecated (obsolete) terms: kept. Labels in atlases annotated years ago (SCimilarity's era)
can be obsolete in today's CL; keeping them lets ``name()`` still answer, and records
``replaced_by`` so the selection can report or remap them. They have no parents (CL strips
an obsolete term's axioms). Obsolete terms with an empty label get the name
``"obsolete <id>"`` so that names stay unique and non-empty.

Output (deterministic; gzip with mtime=0 and no embedded file name, so a rebuild from the
same wheel is byte-identical)::

    {"format": "scimtrain-cl-snapshot/1",
     "version": "CL v2026-03-26 via cellxgene-ontology-guide 1.11.1",
     "source": "...", "relations": ["is_a", "part_of"],
     "terms": {id: [name, [parent ids, sorted]]}, "obsolete": {id: replaced_by or null}}

Usage::

    pip download --no-deps cellxgene-ontology-guide==1.11.1 -d /tmp/cog
    python scripts/build_cl_snapshot.py \
        --wheel /tmp/cog/cellxgene_ontology_guide-1.11.1-py3-none-any.whl
    # or, with the package installed (pip install cellxgene-ontology-guide==1.11.1):
    python scripts/build_cl_snapshot.py

Needs ``zstandard`` (a dependency of this script only, not of scimtrain).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

PACKAGE = "cellxgene-ontology-guide"
PACKAGE_VERSION = "1.11.1"
CL_VERSION = "v2026-03-26"
DATA_MEMBER = f"cellxgene_ontology_guide/data/CL-ontology-{CL_VERSION}.json.zst"
FORMAT = "scimtrain-cl-snapshot/1"
RELATIONS = ["is_a", "part_of"]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "scimtrain" / "data" / "cl_snapshot.json.gz"


def read_zst_from_wheel(wheel: Path) -> bytes:
    """Return the compressed CL asset stored in a cellxgene-ontology-guide wheel."""
    if not wheel.is_file():
        sys.exit(f"{wheel}: no such wheel; get it with "
                 f"`pip download --no-deps {PACKAGE}=={PACKAGE_VERSION} -d DIR`")
    with zipfile.ZipFile(wheel) as zf:
        meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        version = next((line.split(":", 1)[1].strip()
                        for line in zf.read(meta[0]).decode().splitlines()
                        if line.startswith("Version:")), None) if meta else None
        if version != PACKAGE_VERSION:
            sys.exit(f"{wheel} is {PACKAGE} {version}; this script pins {PACKAGE_VERSION}")
        try:
            return zf.read(DATA_MEMBER)
        except KeyError:
            sys.exit(f"{wheel} has no {DATA_MEMBER}")


def read_zst_from_installed() -> bytes:
    """Return the compressed CL asset of the installed cellxgene-ontology-guide package."""
    from importlib import metadata, resources

    try:
        installed = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        sys.exit(
            f"{PACKAGE} is not installed. Either `pip install {PACKAGE}=={PACKAGE_VERSION}` or "
            f"`pip download --no-deps {PACKAGE}=={PACKAGE_VERSION} -d DIR` and pass --wheel."
        )
    if installed != PACKAGE_VERSION:
        sys.exit(f"installed {PACKAGE} is {installed}; this script pins {PACKAGE_VERSION}")
    asset = (resources.files("cellxgene_ontology_guide") / "data"
             / f"CL-ontology-{CL_VERSION}.json.zst")
    return asset.read_bytes()


def decompress(raw: bytes) -> dict:
    import zstandard  # script-only dependency

    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
        return json.loads(reader.read())


def closure(term: str, parents: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(parents.get(term, ()))
    while stack:
        p = stack.pop()
        if p not in seen:
            seen.add(p)
            stack.extend(parents.get(p, ()))
    return seen


def build_snapshot(cl: dict) -> dict:
    """Turn the package's ``{id: {ancestors, label, ...}}`` into the compact snapshot dict."""
    ids = sorted(t for t in cl if t.startswith("CL:"))
    known = set(ids)
    parents: dict[str, list[str]] = {}
    for t in ids:
        anc = {a: d for a, d in cl[t]["ancestors"].items() if a in known}
        parents[t] = sorted(a for a, d in anc.items() if d == 1)

    # Bridge ancestors reached only through filtered-out non-CL terms (see module docstring).
    bridged = 0
    for t in ids:
        anc = {a: d for a, d in cl[t]["ancestors"].items() if a in known}
        missing = set(anc) - closure(t, parents)
        if missing:
            # nearest first, skipping any that an already-added bridge explains
            for a in sorted(missing, key=lambda a: (anc[a], a)):
                if a not in closure(t, parents):
                    parents[t] = sorted(set(parents[t]) | {a})
                    bridged += 1
    for t in ids:
        expected = {a for a in cl[t]["ancestors"] if a in known}
        got = closure(t, parents)
        if got != expected:
            raise SystemExit(f"closure mismatch for {t}: extra {got - expected}, "
                             f"missing {expected - got}")
        if t in got:
            raise SystemExit(f"cycle through {t}")

    terms: dict[str, list] = {}
    obsolete: dict[str, str | None] = {}
    for t in ids:
        rec = cl[t]
        name = rec.get("label") or ""
        if rec.get("deprecated"):
            obsolete[t] = rec.get("replaced_by")
            name = name or f"obsolete {t}"
        elif not name:
            raise SystemExit(f"live term {t} has no label")
        terms[t] = [name, parents[t]]

    names = [v[0] for v in terms.values()]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SystemExit(f"duplicate names in snapshot: {dup[:10]}")
    print(f"{len(terms)} terms ({len(obsolete)} obsolete), "
          f"{sum(len(p) for _, p in terms.values())} parent edges ({bridged} bridged)",
          file=sys.stderr)
    return {
        "format": FORMAT,
        "version": f"CL {CL_VERSION} via {PACKAGE} {PACKAGE_VERSION}",
        "source": ("Cell Ontology (CC BY 4.0, https://obophenotype.github.io/cell-ontology/) "
                   f"release {CL_VERSION}, from {PACKAGE}=={PACKAGE_VERSION} ({DATA_MEMBER}); "
                   "built by scimtrain/scripts/build_cl_snapshot.py"),
        "relations": RELATIONS,
        "terms": terms,
        "obsolete": obsolete,
    }


def write_snapshot(snapshot: dict, out: Path) -> None:
    """Write compact, sorted JSON through gzip with mtime=0 so the bytes are reproducible."""
    payload = json.dumps(snapshot, sort_keys=True, separators=(",", ":"),
                         ensure_ascii=True).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    print(f"wrote {out} ({out.stat().st_size:,} bytes; {len(payload):,} uncompressed)",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path,
                    help=f"a {PACKAGE}-{PACKAGE_VERSION} wheel (default: the installed package)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output file (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    raw = read_zst_from_wheel(args.wheel) if args.wheel else read_zst_from_installed()
    write_snapshot(build_snapshot(decompress(raw)), args.out)


if __name__ == "__main__":
    main()
