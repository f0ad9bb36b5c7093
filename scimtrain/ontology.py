"""The Cell Ontology (CL): names, the parent graph, and the label x label relations training
needs.

Three ways to get one:

- ``CellOntology.default()``: the CL snapshot shipped as package data
  (``scimtrain/data/cl_snapshot.json.gz``, built by ``scripts/build_cl_snapshot.py``); works
  offline.
- ``CellOntology.from_file(path)``: a user's OBO file, OBO Graphs JSON (CL's ``cl.json``), or our
  compact snapshot JSON; any of them may be gzipped.
- ``CellOntology.none()``: no ontology, for labels that are plain strings: every label is known,
  is its own name, and is related to no other label.

What counts as a parent: ``is_a`` and ``part_of`` (BFO:0000050) edges, by default. That is what the
shipped snapshot holds (cellxgene-ontology-guide follows exactly those two from CL's classified
``cl.owl``). SCimilarity loads ``cl-basic.obo`` with obonet, whose graph also carries
``develops_from`` (RO:0002202) edges; to reproduce that, pass that file with
``relations=("is_a", "part_of", "develops_from")``. Obsolete terms are kept (``name()`` answers,
``replaced_by()`` says what replaces them) but have no parents. Edges to ids that the source does
not define as terms (e.g. ``part_of UBERON:...`` in a CL-only OBO) are dropped.

Ordering: ``parents()`` returns ids sorted, and every rule that needs "the first" of several terms
uses that order, so results never depend on set or hash order.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Collection, Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_RELATIONS", "CellOntology", "OntologyFileError", "UnknownTermError"]

DEFAULT_RELATIONS: tuple[str, ...] = ("is_a", "part_of")
SNAPSHOT_FORMAT = "scimtrain-cl-snapshot/1"
_SNAPSHOT = "cl_snapshot.json.gz"
_OBO_PURL = "http://purl.obolibrary.org/obo/"
# Relation CURIEs as they appear in OBO Graphs JSON (and sometimes in OBO files) -> OBO names.
_RELATION_NAMES = {
    "BFO:0000050": "part_of",
    "BFO:0000051": "has_part",
    "RO:0002202": "develops_from",
    "RO:0002203": "develops_into",
    "is_a": "is_a",
    "subClassOf": "is_a",
}
_HOW_TO = ("pass --ontology FILE (OBO or JSON) with a Cell Ontology that has it, "
           "or use the no-ontology mode (--ontology none)")


class UnknownTermError(KeyError):
    """A term id (or name) that the ontology does not hold."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0]) if self.args else ""


class OntologyFileError(ValueError):
    """An ontology file that cannot be read as OBO or JSON."""


class CellOntology:
    """An ontology as a parent graph over term ids.

    Build one with ``default()``, ``from_file()``, ``none()`` or ``from_spec()``; the constructor
    takes already-parsed data: ``names`` {id: name}, ``parents`` {id: parent ids} (targets that are
    not terms are dropped), ``obsolete`` {id: replacing id or None}.
    """

    def __init__(
        self,
        names: dict[str, str],
        parents: dict[str, Iterable[str]],
        *,
        obsolete: dict[str, str | None] | None = None,
        version: str = "unknown",
        source: str = "",
        open_world: bool = False,
    ) -> None:
        self.version = version
        self.source = source
        # open_world: the no-ontology mode; every id is a term named by itself, with no relations.
        self.open_world = open_world
        self._names = dict(names)
        self._obsolete = dict(obsolete or {})
        self._parents: dict[str, tuple[str, ...]] = {
            t: tuple(sorted({p for p in parents.get(t, ()) if p in self._names and p != t}))
            for t in self._names
        }
        children: dict[str, list[str]] = {}
        for t, ps in self._parents.items():
            for p in ps:
                children.setdefault(p, []).append(t)
        self._children = {p: tuple(sorted(cs)) for p, cs in children.items()}
        # Prefer live terms when an obsolete one shares a name (OBO allows it).
        self._ids_by_name: dict[str, str] = {}
        for t in sorted(self._names, key=lambda t: (t in self._obsolete, t)):
            self._ids_by_name.setdefault(self._names[t], t)
        self._ancestors: dict[str, frozenset[str]] = {}
        self._descendants: dict[str, frozenset[str]] = {}

    # ---------------------------------------------------------------- constructors
    @classmethod
    def default(cls) -> CellOntology:
        """The shipped CL snapshot (cached: every call returns the same object)."""
        return _load_default()

    @classmethod
    def none(cls) -> CellOntology:
        """The no-ontology mode: labels are plain strings, none related to another."""
        return cls({}, {}, version="none", source="no ontology (labels used as given)",
                   open_world=True)

    @classmethod
    def from_spec(cls, spec: str | Path | None) -> CellOntology:
        """What a ``--ontology`` option names.

        None/"default" -> default(), "none" -> none(), anything else -> from_file().
        """
        if spec is None or str(spec).lower() == "default":
            return cls.default()
        if str(spec).lower() == "none":
            return cls.none()
        return cls.from_file(spec)

    @classmethod
    def from_file(cls, path: str | Path,
                  relations: Sequence[str] = DEFAULT_RELATIONS) -> CellOntology:
        """Read an OBO, OBO Graphs JSON or compact-snapshot JSON file (optionally gzipped).

        ``relations`` are the edge kinds that count as parents, by OBO name (``is_a``, ``part_of``,
        ``develops_from``, ...). The compact snapshot stores is_a + part_of only.
        Raises FileNotFoundError for a missing file and OntologyFileError for an unreadable one.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"ontology file {str(path)!r} does not exist; give the path of an OBO or JSON "
                "Cell Ontology file, leave --ontology out for the built-in CL snapshot, or use "
                "--ontology none"
            )
        raw = path.read_bytes()
        try:
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            text = raw.decode("utf-8-sig")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise OntologyFileError(
                f"ontology file {str(path)!r} is neither text nor gzipped text ({e})"
            ) from e
        stripped = text.lstrip()
        if stripped.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise OntologyFileError(
                    f"ontology file {str(path)!r} is not valid JSON: {e}"
                ) from e
            if isinstance(data, dict) and "terms" in data:
                return cls._from_snapshot(data, source=str(path), relations=relations)
            if isinstance(data, dict) and "graphs" in data:
                return cls._from_obographs(data, path, relations)
            raise OntologyFileError(
                f"ontology file {str(path)!r} is JSON but neither OBO Graphs ('graphs') "
                "nor a scimtrain snapshot ('terms')"
            )
        if "[Term]" in text or stripped.startswith("format-version"):
            return cls._from_obo(text, path, relations)
        raise OntologyFileError(
            f"ontology file {str(path)!r} is neither OBO (no [Term] stanza) nor JSON; "
            "give an OBO file (e.g. cl-basic.obo), CL's cl.json, or a scimtrain snapshot"
        )

    @classmethod
    def _from_snapshot(cls, data: dict, source: str,
                       relations: Sequence[str] = DEFAULT_RELATIONS) -> CellOntology:
        stored = tuple(data.get("relations", DEFAULT_RELATIONS))
        if not set(_relation_names(relations)) <= set(stored):
            raise OntologyFileError(
                f"snapshot {source!r} holds {list(stored)} edges only; "
                f"cannot give {list(relations)}"
            )
        try:
            terms = data["terms"]
            names = {t: v[0] for t, v in terms.items()}
            parents = {t: v[1] for t, v in terms.items()}
        except (TypeError, IndexError, AttributeError) as e:
            raise OntologyFileError(
                f"snapshot {source!r}: 'terms' must map id -> [name, [parent ids]]"
            ) from e
        return cls(names, parents, obsolete=data.get("obsolete", {}),
                   version=data.get("version", "unknown"), source=data.get("source", source))

    @classmethod
    def _from_obo(cls, text: str, path: Path, relations: Sequence[str]) -> CellOntology:
        """Parse ``[Term]`` stanzas: id, name, is_a, relationship, is_obsolete, replaced_by."""
        wanted = set(_relation_names(relations))
        names: dict[str, str] = {}
        parents: dict[str, set[str]] = {}
        obsolete: dict[str, str | None] = {}
        replaced: dict[str, str] = {}
        header: dict[str, str] = {}
        stanza: str | None = None  # None: header; "Term"; anything else is skipped
        term: str | None = None
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("!"):
                continue
            if line.startswith("[") and line.endswith("]"):
                stanza, term = line[1:-1], None
                continue
            tag, sep, value = line.partition(":")
            if not sep or " " in tag.strip():  # OBO tags never hold spaces
                raise OntologyFileError(
                    f"{path}:{lineno}: expected 'tag: value', got {line[:80]!r}"
                )
            tag, value = tag.strip(), _strip_obo_value(value)
            if stanza is None:
                header.setdefault(tag, value)
            elif stanza != "Term":
                continue
            elif tag == "id":
                term = value
                names.setdefault(term, term)
                parents.setdefault(term, set())
            elif term is None:
                raise OntologyFileError(f"{path}:{lineno}: {tag!r} before the stanza's 'id:' line")
            elif tag == "name":
                names[term] = value
            elif tag == "is_a" and "is_a" in wanted:
                parents[term].add(value.split()[0])
            elif tag == "relationship":
                rel, _, target = value.partition(" ")
                if _RELATION_NAMES.get(rel, rel) in wanted and target.strip():
                    parents[term].add(target.split()[0])
            elif tag == "is_obsolete" and value.lower() == "true":
                obsolete[term] = None
            elif tag == "replaced_by" and value:
                replaced.setdefault(term, value.split()[0])
        if not names:
            raise OntologyFileError(
                f"ontology file {str(path)!r} has no [Term] stanza with an 'id:' line"
            )
        # replaced_by without is_obsolete does not make a term obsolete
        obsolete = {t: replaced.get(t) for t in obsolete}
        version = header.get("data-version") or header.get("date") or "unknown version"
        ont = header.get("ontology", "ontology")
        return cls(names, parents, obsolete=obsolete,
                   version=f"{ont} {version} from {path.name}", source=str(path))

    @classmethod
    def _from_obographs(cls, data: dict, path: Path, relations: Sequence[str]) -> CellOntology:
        """Read OBO Graphs JSON (``{"graphs": [{"nodes": [...], "edges": [...]}]}``).

        All graphs are merged.
        """
        wanted = set(_relation_names(relations))
        names: dict[str, str] = {}
        parents: dict[str, set[str]] = {}
        obsolete: dict[str, str | None] = {}
        versions = []
        try:
            for graph in data["graphs"]:
                meta = graph.get("meta") or {}
                if meta.get("version"):
                    versions.append(str(meta["version"]))
                for node in graph.get("nodes", []):
                    if node.get("type", "CLASS") != "CLASS":
                        continue  # properties, individuals
                    t = _curie(node["id"])
                    names[t] = node.get("lbl") or names.get(t, t)
                    parents.setdefault(t, set())
                    nmeta = node.get("meta") or {}
                    if nmeta.get("deprecated"):
                        repl = [_curie(p["val"]) for p in nmeta.get("basicPropertyValues", [])
                                if p.get("pred", "").endswith("IAO_0100001") and p.get("val")]
                        obsolete[t] = repl[0] if repl else None
                for edge in graph.get("edges", []):
                    if _RELATION_NAMES.get(_curie(edge["pred"]), edge["pred"]) in wanted:
                        parents.setdefault(_curie(edge["sub"]), set()).add(_curie(edge["obj"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise OntologyFileError(
                f"ontology file {str(path)!r} is not valid OBO Graphs JSON (missing {e})"
            ) from e
        if not names:
            raise OntologyFileError(f"ontology file {str(path)!r} has no CLASS nodes")
        version = versions[0] if versions else "unknown version"
        return cls(names, parents, obsolete=obsolete,
                   version=f"{version} from {path.name}", source=str(path))

    # ---------------------------------------------------------------- lookups
    def __contains__(self, term_id: object) -> bool:
        return isinstance(term_id, str) and (self.open_world or term_id in self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __repr__(self) -> str:
        what = "no ontology" if self.open_world else f"{len(self)} terms"
        return f"CellOntology({self.version!r}, {what})"

    def name(self, term_id: str) -> str:
        """The term's name.

        UnknownTermError names the id and what to do when the id is not a term.
        """
        if self.open_world:
            return term_id
        try:
            return self._names[term_id]
        except KeyError:
            raise UnknownTermError(
                f"{term_id!r} is not a term of {self.version} ({self.source}); {_HOW_TO}"
            ) from None

    def id_of(self, name: str) -> str:
        """The id whose name is exactly ``name`` (a live term before an obsolete one)."""
        if self.open_world:
            return name
        try:
            return self._ids_by_name[name]
        except KeyError:
            raise UnknownTermError(
                f"no term is named {name!r} in {self.version}; {_HOW_TO}"
            ) from None

    def is_obsolete(self, term_id: str) -> bool:
        """True for a known term marked obsolete."""
        self._check(term_id)
        return term_id in self._obsolete

    def replaced_by(self, term_id: str) -> str | None:
        """The id that replaces an obsolete term (may belong to another ontology), else None."""
        self._check(term_id)
        return self._obsolete.get(term_id)

    # ---------------------------------------------------------------- graph
    def parents(self, term_id: str) -> tuple[str, ...]:
        """Direct parents (``relations`` edges), sorted by id."""
        self._check(term_id)
        return self._parents.get(term_id, ())

    def children(self, term_id: str) -> tuple[str, ...]:
        """Direct children, sorted by id."""
        self._check(term_id)
        return self._children.get(term_id, ())

    def ancestors(self, term_id: str) -> frozenset[str]:
        """All strict ancestors (the term itself excluded, even on a cycle); cached."""
        self._check(term_id)
        if term_id not in self._ancestors:
            self._ancestors[term_id] = _reach(term_id, self._parents)
        return self._ancestors[term_id]

    def descendants(self, term_id: str) -> frozenset[str]:
        """All strict descendants; computed on first ask and cached."""
        self._check(term_id)
        if term_id not in self._descendants:
            self._descendants[term_id] = _reach(term_id, self._children)
        return self._descendants[term_id]

    def most_viable_parent(self, term_id: str, present: Collection[str]) -> str | None:
        """The coarse-graining target (docs/scimilarity.md §2.5) for ``term_id`` among the
        ``present`` labels, or None.

        With P = the term's parents that are present (sorted by id):
        - one in P: that parent;
        - none in P: if the term has exactly one parent (present or not) and that parent has
          exactly one present parent, that grandparent; otherwise None;
        - several in P: the first p in P (by id) whose strict ancestors include another member of
          P, i.e. the most specific present parent; None if no member of P lies below another.
        Unknown terms and the no-ontology mode give None (nothing to coarse-grain to).
        This follows SCimilarity's ``find_most_viable_parent``, with its set order made sorted.
        """
        if self.open_world or term_id not in self._names:
            return None
        present = present if isinstance(present, (set, frozenset)) else set(present)
        in_present = [p for p in self._parents[term_id] if p in present]
        if len(in_present) == 1:
            return in_present[0]
        if not in_present:
            all_parents = self._parents[term_id]
            if len(all_parents) == 1:
                grand = [g for g in self._parents[all_parents[0]] if g in present]
                if len(grand) == 1:
                    return grand[0]
            return None
        for p in in_present:
            others = set(in_present) - {p}
            if self.ancestors(p) & others:
                return p
        return None

    # ---------------------------------------------------------------- label x label matrices
    def descendant_matrix(self, label_ids: Sequence[str]) -> np.ndarray:
        """L x L bool: ``[i, j]`` True when label_ids[j] is a strict descendant of label_ids[i].

        Unknown ids (and every id in the no-ontology mode) get an all-False row and column.
        Built from each label's ancestors (short lists), so ~100 labels cost well under a
        millisecond once cached.
        """
        n = len(label_ids)
        out = np.zeros((n, n), dtype=bool)
        if self.open_world or n == 0:
            return out
        rows: dict[str, list[int]] = {}
        for i, t in enumerate(label_ids):
            rows.setdefault(t, []).append(i)
        for j, t in enumerate(label_ids):
            if t not in self._names:
                continue
            for a in self.ancestors(t):
                for i in rows.get(a, ()):
                    out[i, j] = True
        return out

    def parent_matrix(self, label_ids: Sequence[str]) -> np.ndarray:
        """L x L bool: ``[i, j]`` True when label_ids[j] is a direct parent of label_ids[i]."""
        n = len(label_ids)
        out = np.zeros((n, n), dtype=bool)
        if self.open_world or n == 0:
            return out
        cols: dict[str, list[int]] = {}
        for j, t in enumerate(label_ids):
            cols.setdefault(t, []).append(j)
        for i, t in enumerate(label_ids):
            for p in self._parents.get(t, ()):
                for j in cols.get(p, ()):
                    out[i, j] = True
        return out

    # ---------------------------------------------------------------- helpers
    def _check(self, term_id: str) -> None:
        if not self.open_world and term_id not in self._names:
            raise UnknownTermError(
                f"{term_id!r} is not a term of {self.version} ({self.source}); {_HOW_TO}"
            )


@functools.lru_cache(maxsize=1)
def _load_default() -> CellOntology:
    """Load the packaged snapshot once per process."""
    blob = resources.files("scimtrain").joinpath("data", _SNAPSHOT)
    try:
        raw = blob.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the packaged CL snapshot scimtrain/data/{_SNAPSHOT} is missing (a broken install?); "
            f"reinstall scimtrain, regenerate it with scripts/build_cl_snapshot.py, or {_HOW_TO}"
        ) from None
    data = json.loads(gzip.decompress(raw))
    return CellOntology._from_snapshot(data, source=f"scimtrain/data/{_SNAPSHOT}")


def _reach(start: str, edges: dict[str, tuple[str, ...]]) -> frozenset[str]:
    """Every node reachable from ``start`` along ``edges``, ``start`` itself excluded."""
    seen: set[str] = set()
    stack = list(edges.get(start, ()))
    while stack:
        t = stack.pop()
        if t not in seen:
            seen.add(t)
            stack.extend(edges.get(t, ()))
    seen.discard(start)
    return frozenset(seen)


def _curie(iri: str) -> str:
    """``http://purl.obolibrary.org/obo/CL_0000236`` -> ``CL:0000236``.

    CURIEs and other strings pass through unchanged.
    """
    if iri.startswith(_OBO_PURL):
        local = iri[len(_OBO_PURL):]
        prefix, sep, rest = local.partition("_")
        return f"{prefix}:{rest}" if sep and "/" not in local else local
    return iri


def _relation_names(relations: Iterable[str]) -> list[str]:
    """Normalise relation names/CURIEs/IRIs to OBO names (``part_of``, ``is_a``, ...)."""
    return [_RELATION_NAMES.get(_curie(r), r) for r in relations]


def _strip_obo_value(value: str) -> str:
    """Drop an OBO value's trailing ``! comment`` and ``{qualifiers}``; keep quoted text intact."""
    value = value.strip()
    if value.startswith('"'):  # def/synonym: quoted text may contain '!' and '{'
        return value
    value = value.split(" !", 1)[0]
    if value.endswith("}") and "{" in value:
        value = value[: value.index("{")]
    return value.strip()
