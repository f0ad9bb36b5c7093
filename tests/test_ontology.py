"""CellOntology: the shipped CL snapshot, OBO / OBO Graphs JSON parsing, docs/scimilarity.md §2.5's
most-viable-parent rule, the label x label matrices, the no-ontology mode and bad input."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from scimtrain.ontology import CellOntology, OntologyFileError, UnknownTermError

# A toy ontology shaped to reach every branch of the most-viable-parent rule.
#   X:1 cell
#   X:2 lymphocyte        is_a X:1
#   X:3 T cell            is_a X:2
#   X:4 B cell            is_a X:2
#   X:5 Treg              is_a X:3, develops_from X:4 (not a parent by default)
#   X:6 Treg subtype      is_a X:5 (single parent -> grandparent branch)
#   X:7 redundant         is_a X:3, is_a X:2 (X:3 lies below X:2)
#   X:8 two-below         is_a X:3, is_a X:4, is_a X:2 (X:3 and X:4 both lie below X:2)
#   X:9 two-unrelated     is_a X:3, is_a X:4
#   X:10 T cell part      part_of X:3, part_of UBERON:1 (not a term here: dropped)
#   X:11 two parents      is_a X:5, is_a X:9
#   X:99 obsolete, replaced by X:3
TOY_OBO = """\
format-version: 1.2
data-version: toy/releases/2024-01-01
ontology: toy
! a comment line

[Term]
id: X:1
name: cell

[Term]
id: X:2
name: lymphocyte
def: "A cell! with {braces}" [ref:1]
is_a: X:1 ! cell

[Term]
id: X:3
name: T cell
is_a: X:2 {is_inferred="true"} ! lymphocyte

[Term]
id: X:4
name: B cell
is_a: X:2

[Term]
id: X:5
name: Treg
is_a: X:3 ! T cell
relationship: develops_from X:4 ! B cell (made up)

[Term]
id: X:6
name: Treg subtype
is_a: X:5

[Term]
id: X:7
name: redundant
is_a: X:3
is_a: X:2

[Term]
id: X:8
name: two below
is_a: X:4
is_a: X:3
is_a: X:2

[Term]
id: X:9
name: two unrelated
is_a: X:3
is_a: X:4

[Term]
id: X:10
name: T cell part
relationship: part_of X:3 ! T cell
relationship: part_of UBERON:1 ! dangling

[Term]
id: X:11
name: two parents
is_a: X:5
is_a: X:9

[Term]
id: X:99
name: obsolete T cell
is_obsolete: true
replaced_by: X:3

[Typedef]
id: part_of
name: part of
is_a: overlaps
"""


@pytest.fixture
def toy(tmp_path) -> CellOntology:
    path = tmp_path / "toy.obo"
    path.write_text(TOY_OBO)
    return CellOntology.from_file(path)


# ---------------------------------------------------------------- the shipped snapshot
def test_default_loads_offline_and_is_cached():
    from scimtrain.ontology import _load_default

    _load_default.cache_clear()
    cl = CellOntology.default()
    assert CellOntology.default() is cl
    assert len(cl) > 3000
    assert cl.version.startswith("CL v2026-03-26")
    assert "cellxgene-ontology-guide 1.11.1" in cl.version
    assert "Cell Ontology" in cl.source


def test_default_known_facts():
    cl = CellOntology.default()
    assert cl.name("CL:0000815") == "regulatory T cell"
    assert cl.name("CL:0000084") == "T cell"
    assert cl.name("CL:0000236") == "B cell"
    assert cl.name("CL:0000000") == "cell"
    assert "CL:0000084" in cl.ancestors("CL:0000815")
    assert "CL:0000792" in cl.descendants("CL:0000815")
    assert "CL:0000815" in cl.ancestors("CL:0000792")
    assert "CL:0000000" in cl.ancestors("CL:0000236")
    assert "CL:0000236" in cl.descendants("CL:0000945")  # lymphocyte of B lineage
    assert "CL:0000236" not in cl.ancestors("CL:0000084") | cl.descendants("CL:0000084")
    assert cl.ancestors("CL:0000000") == frozenset()
    # parents are direct, sorted, and their ancestors explain every ancestor
    for t in ("CL:0000815", "CL:0000792", "CL:0000236", "CL:0000057"):
        ps = cl.parents(t)
        assert list(ps) == sorted(ps)
        assert cl.ancestors(t) == set(ps).union(*(cl.ancestors(p) for p in ps))
    # SCimilarity's harmonisation targets exist (docs/scimilarity.md §2.3)
    for t in ("CL:0000815", "CL:0000896", "CL:0000451", "CL:0000782", "CL:0000784", "CL:0009010"):
        assert t in cl and not cl.is_obsolete(t)


def test_default_name_id_round_trip_and_obsolete_terms():
    cl = CellOntology.default()
    for t in ("CL:0000815", "CL:0000236", "CL:0000084", "CL:0000057"):
        assert cl.id_of(cl.name(t)) == t
    assert all(cl.id_of(cl.name(t)) == t for t in cl)  # names are unique
    assert cl.is_obsolete("CL:0000044") and cl.replaced_by("CL:0000044") == "CL:0000051"
    assert cl.parents("CL:0000044") == ()


def test_default_descendant_matrix():
    cl = CellOntology.default()
    ids = [t for t in cl if not cl.is_obsolete(t)][::30][:100] + ["CL:0000084", "CL:0000815"]
    m = cl.descendant_matrix(ids)
    assert m.shape == (len(ids), len(ids)) and m.dtype == bool
    expected = [[b in cl.descendants(a) for b in ids] for a in ids]
    assert m.tolist() == expected and m[-2, -1] and not m[-1, -2]  # Treg under T cell
    assert (cl.descendant_matrix(ids) == m).all()  # the cached answer is the same


# ---------------------------------------------------------------- matrices
def test_descendant_matrix_semantics(toy):
    ids = ["X:1", "X:3", "X:5", "X:4", "nope", "X:6"]
    m = toy.descendant_matrix(ids)
    expected = {(0, 1), (0, 2), (0, 3), (0, 5), (1, 2), (1, 5), (2, 5)}
    assert {tuple(ix) for ix in np.argwhere(m)} == expected
    assert not m[4].any() and not m[:, 4].any()  # unknown id: row and column all False
    assert not np.diag(m).any()
    assert not (m & m.T).any()  # strict: never both ways


def test_descendant_matrix_transitive_and_consistent(toy):
    ids = sorted(toy)
    m = toy.descendant_matrix(ids)
    # transitivity: i > j > k implies i > k
    m2 = (m.astype(int) @ m.astype(int)) > 0
    assert not (m2 & ~m).any()
    for i, a in enumerate(ids):
        assert {ids[j] for j in np.flatnonzero(m[i])} == toy.descendants(a)
        assert {ids[j] for j in np.flatnonzero(m[:, i])} == toy.ancestors(a)


def test_parent_matrix(toy):
    ids = ["X:3", "X:2", "X:9", "X:4", "X:3"]
    p = toy.parent_matrix(ids)
    assert {tuple(ix) for ix in np.argwhere(p)} == {(0, 1), (4, 1), (2, 0), (2, 4), (2, 3), (3, 1)}
    # a direct parent is an ancestor
    d = toy.descendant_matrix(ids)
    assert not (p & ~d.T).any()
    assert toy.parent_matrix([]).shape == (0, 0)


# ---------------------------------------------------------------- most viable parent
# (docs/scimilarity.md §2.5)
def test_mvp_one_present_parent(toy):
    assert toy.most_viable_parent("X:5", {"X:3", "X:1"}) == "X:3"
    assert toy.most_viable_parent("X:9", {"X:4", "X:1"}) == "X:4"  # one of two parents present


def test_mvp_part_of_counts_as_parent(toy):
    assert toy.parents("X:10") == ("X:3",)  # UBERON:1 is not a term of this file
    assert toy.most_viable_parent("X:10", {"X:3"}) == "X:3"


def test_mvp_no_present_parent_grandparent_branch(toy):
    # single parent X:5 absent, its only present parent X:3 -> X:3
    assert toy.most_viable_parent("X:6", {"X:3", "X:6"}) == "X:3"
    # grandparent absent too -> None (no climbing further)
    assert toy.most_viable_parent("X:6", {"X:2", "X:1"}) is None
    # several parents, none present -> None, even with a present grandparent
    assert toy.most_viable_parent("X:11", {"X:3"}) is None
    # no parent at all
    assert toy.most_viable_parent("X:1", {"X:2"}) is None


def test_mvp_grandparent_must_be_unique(tmp_path):
    path = tmp_path / "dev.obo"
    path.write_text(TOY_OBO)
    dev = CellOntology.from_file(path, relations=("is_a", "part_of", "develops_from"))
    assert dev.parents("X:5") == ("X:3", "X:4")
    assert dev.most_viable_parent("X:6", {"X:3"}) == "X:3"
    assert dev.most_viable_parent("X:6", {"X:3", "X:4"}) is None  # two present grandparents


def test_mvp_several_present_parents(toy):
    # X:3 has the other present parent X:2 among its ancestors -> the more specific X:3
    assert toy.most_viable_parent("X:7", {"X:2", "X:3"}) == "X:3"
    # X:3 and X:4 both lie below X:2: the first by id wins
    assert toy.most_viable_parent("X:8", {"X:2", "X:3", "X:4"}) == "X:3"
    # two present parents, neither below the other -> None
    assert toy.most_viable_parent("X:9", {"X:3", "X:4"}) is None
    assert toy.most_viable_parent("X:8", {"X:3", "X:4"}) is None


def test_mvp_unknown_and_accepts_any_collection(toy):
    assert toy.most_viable_parent("X:404", {"X:3"}) is None
    assert toy.most_viable_parent("X:5", ["X:3"]) == "X:3"


def test_mvp_on_cl():
    cl = CellOntology.default()
    # CL:0000792 (CD4+ CD25+ ab Treg) has parents CL:0000624 and CL:0000815
    assert set(cl.parents("CL:0000792")) >= {"CL:0000815"}
    assert cl.most_viable_parent("CL:0000792", {"CL:0000815", "CL:0000236"}) == "CL:0000815"


# ---------------------------------------------------------------- parsing
def test_obo_parsing(toy, tmp_path):
    assert toy.name("X:3") == "T cell" and toy.id_of("T cell") == "X:3"
    assert toy.parents("X:3") == ("X:2",)  # qualifiers and comments stripped
    assert toy.parents("X:5") == ("X:3",)  # develops_from not a parent by default
    assert toy.parents("X:8") == ("X:2", "X:3", "X:4")
    assert "part_of" not in toy  # the [Typedef] stanza is skipped
    assert toy.is_obsolete("X:99") and toy.replaced_by("X:99") == "X:3"
    assert not toy.is_obsolete("X:3") and toy.replaced_by("X:3") is None
    assert toy.version == "toy toy/releases/2024-01-01 from toy.obo"
    assert toy.children("X:2") == ("X:3", "X:4", "X:7", "X:8")
    # gzipped OBO reads the same
    gz = tmp_path / "toy.obo.gz"
    gz.write_bytes(gzip.compress(TOY_OBO.encode()))
    again = CellOntology.from_file(gz)
    assert again.descendants("X:1") == toy.descendants("X:1")


def test_obographs_json(tmp_path):
    purl = "http://purl.obolibrary.org/obo/"
    doc = {
        "graphs": [{
            "id": purl + "cl.json",
            "meta": {"version": purl + "cl/releases/2024-01-04/cl.json"},
            "nodes": [
                {"id": purl + "CL_0000000", "lbl": "cell", "type": "CLASS"},
                {"id": purl + "CL_0000084", "lbl": "T cell", "type": "CLASS"},
                {"id": purl + "CL_0000815", "lbl": "regulatory T cell", "type": "CLASS"},
                {"id": purl + "CL_0000003", "lbl": "obsolete native cell", "type": "CLASS",
                 "meta": {"deprecated": True, "basicPropertyValues": [
                     {"pred": purl + "IAO_0100001", "val": purl + "CL_0000000"}]}},
                {"id": purl + "UBERON_0000178", "lbl": "blood", "type": "CLASS"},
                {"id": purl + "BFO_0000050", "lbl": "part of", "type": "PROPERTY"},
            ],
            "edges": [
                {"sub": purl + "CL_0000084", "pred": "is_a", "obj": purl + "CL_0000000"},
                {"sub": purl + "CL_0000815", "pred": "is_a", "obj": purl + "CL_0000084"},
                {"sub": purl + "CL_0000084", "pred": purl + "BFO_0000050",
                 "obj": purl + "UBERON_0000178"},
                {"sub": purl + "CL_0000815", "pred": purl + "RO_0002202",
                 "obj": purl + "CL_0000000"},
            ],
        }]
    }
    path = tmp_path / "cl.json.gz"
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))
    ont = CellOntology.from_file(path)
    assert ont.name("CL:0000815") == "regulatory T cell"
    assert ont.parents("CL:0000815") == ("CL:0000084",)  # develops_from not counted
    assert ont.parents("CL:0000084") == ("CL:0000000", "UBERON:0000178")  # part_of counted
    assert ont.ancestors("CL:0000815") == {"CL:0000084", "CL:0000000", "UBERON:0000178"}
    assert "BFO:0000050" not in ont
    assert ont.replaced_by("CL:0000003") == "CL:0000000"
    assert "2024-01-04" in ont.version
    dev = CellOntology.from_file(path, relations=("is_a", "develops_from"))
    assert dev.parents("CL:0000815") == ("CL:0000000", "CL:0000084")


def test_snapshot_json_round_trip(tmp_path):
    doc = {"format": "scimtrain-cl-snapshot/1", "version": "v1", "source": "hand",
           "relations": ["is_a", "part_of"],
           "terms": {"A:1": ["a", []], "A:2": ["b", ["A:1"]], "A:3": ["c", ["A:2"]]},
           "obsolete": {}}
    path = tmp_path / "snap.json"
    path.write_text(json.dumps(doc))
    ont = CellOntology.from_file(path)
    assert ont.version == "v1" and ont.descendants("A:1") == {"A:2", "A:3"}
    with pytest.raises(OntologyFileError, match="develops_from"):
        CellOntology.from_file(path, relations=("is_a", "develops_from"))


def test_from_spec(tmp_path):
    assert CellOntology.from_spec(None) is CellOntology.default()
    assert CellOntology.from_spec("default") is CellOntology.default()
    assert CellOntology.from_spec("none").open_world
    path = tmp_path / "toy.obo"
    path.write_text(TOY_OBO)
    assert "X:3" in CellOntology.from_spec(str(path))


# ---------------------------------------------------------------- no-ontology mode
def test_no_ontology_mode():
    none = CellOntology.none()
    assert "anything" in none and "CL:0000815" in none
    assert none.name("my label") == "my label" and none.id_of("my label") == "my label"
    assert none.parents("a") == () and none.ancestors("a") == frozenset()
    assert none.descendants("a") == frozenset()
    assert not none.descendant_matrix(["a", "b", "c"]).any()
    assert not none.parent_matrix(["a", "b"]).any()
    assert none.most_viable_parent("a", {"a", "b"}) is None
    assert not none.is_obsolete("a")


# ---------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.obo.*--ontology none"):
        CellOntology.from_file(tmp_path / "nope.obo")


@pytest.mark.parametrize("content, match", [
    (b"hello world\n", "neither OBO"),
    (b"{not json", "not valid JSON"),
    (b'{"foo": 1}', "neither OBO Graphs"),
    (b'{"graphs": [{"nodes": [{"lbl": "no id"}]}]}', "not valid OBO Graphs"),
    (b"[Term]\nname: x\n", "before the stanza's 'id:'"),
    (b"[Term]\nid X:1\n", "expected 'tag: value'"),
    (b"\x1f\x8b\x08garbage", "neither text nor gzipped"),
    (b"\xff\xfe\x00bin", "neither text nor gzipped"),
])
def test_unparseable_files(tmp_path, content, match):
    path = tmp_path / "bad.obo"
    path.write_bytes(content)
    with pytest.raises(OntologyFileError, match=match) as err:
        CellOntology.from_file(path)
    assert "bad.obo" in str(err.value)


def test_unknown_ids_say_what_to_do(toy):
    cl = CellOntology.default()
    with pytest.raises(UnknownTermError,
                       match=r"'CL:9999999' is not a term of CL v2026-03-26.*--ontology"):
        cl.name("CL:9999999")
    with pytest.raises(KeyError):  # UnknownTermError is a KeyError
        cl.parents("CL:9999999")
    with pytest.raises(UnknownTermError, match="no term is named 'T-cell'"):
        cl.id_of("T-cell")
    with pytest.raises(UnknownTermError, match="X:404"):
        toy.descendants("X:404")
    assert "X:404" not in toy and 42 not in toy
