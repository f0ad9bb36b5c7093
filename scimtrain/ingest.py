"""Build a CellArr-layout training store (docs/scimilarity.md §1) from h5ad files.

Two passes over the inputs (reading and checking a file is :mod:`scimtrain.h5ad`'s job):

1. **inspect** (cheap, nothing written): every file is inspected (its counts, genes and
   ``obs`` columns found, its first rows of counts checked) and the files' gene naming
   compared before anything is written, so a bad tenth file fails in seconds, not after nine
   were converted.
2. **convert**: file by file, rows in chunks (memory bounded by one chunk; CSC or dense-in-memory
   files by one file): every value checked, QC columns computed, genes remapped to the store's
   gene space, the chunks appended to one TileDB fragment.

The store is written by :mod:`scimtrain.writer` directly rather than by the ``cellarr``
package: cellarr 0.6.2 reads counts only from a layer, loads each file whole and remaps genes
in a Python loop per non-zero (measured here: 54 s and 3 GB for 20,000 cells, against 8 s and
a bounded chunk), silently sums duplicate genes, checks no values, writes no QC or label
columns and cannot append (README, "Your own data"). It is built in the sibling folder
``OUT.partial`` and renamed to ``OUT`` only once complete, so an interrupted build never leaves
a store at ``OUT``; a rerun removes the leftover. Appending copies the store to ``OUT.partial``
with hard links (TileDB never rewrites a file in place), appends there, and swaps the folders.

The source options, :class:`IngestError` and the column names come from :mod:`scimtrain.h5ad`
and are importable from here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tiledb
from tqdm.auto import tqdm

from scimtrain import __version__
from scimtrain.columns import (
    BUILT_CELL_COLUMNS,
    DISEASE_COLUMN,
    LABEL_COLUMN,
    MISSING_LABEL,
    SAMPLE_COLUMN,
    STUDY_COLUMN,
)
from scimtrain.h5ad import (
    CHECK_ROWS,
    Converted,
    FileInfo,
    IngestError,
    Source,
    SourceOptions,
    convert,
    gene_space,
    inspect_file,
)
from scimtrain.store import CellArrStore, StoreError, join_uri
from scimtrain.writer import fresh_store, write_counts, write_frames

BUILD_RECORD = "scimtrain_build.json"  # provenance; also marks a .partial folder as ours
REPLACED_MARK = ".scimtrain_replaced"  # marks an old store moved aside during a swap
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BuildOptions:
    """How to write the store.

    mt_prefix: gene symbols starting with it (any case) are mitochondrial (``pct_counts_mt``).
    chunk_cells: rows read, checked and written at a time (bounds memory).
    value_dtype: ``"uint32"`` or ``"uint16"`` (half the value bytes; counts > 65535 refused).
    counts_location: ``"counts"`` (SCimilarity) or ``"assays/counts"`` (cellarr).
    capacity: non-zeros per TileDB data tile.
    progress: progress bars over files and cells.
    """

    mt_prefix: str = "MT-"
    chunk_cells: int = 10_000
    value_dtype: str = "uint32"
    counts_location: str = "counts"
    capacity: int = 10_000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.value_dtype not in DTYPES:
            raise IngestError(f"value_dtype must be one of {sorted(DTYPES)}, "
                              f"not {self.value_dtype!r}")
        if self.chunk_cells < 1:
            raise IngestError("chunk_cells must be >= 1")


def find_sources(inputs: Sequence[str | os.PathLike],
                 options: SourceOptions = SourceOptions()) -> list[Source]:  # noqa: B008 (frozen)
    """h5ad files, or folders of them (``*.h5ad``, sorted), as sources with shared options."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(item.glob("*.h5ad"))
            if not found:
                raise IngestError(f"{item} holds no *.h5ad file")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise IngestError(f"{item} does not exist")
    return [Source(p, options) for p in paths]


def read_manifest(path: str | os.PathLike,
                  defaults: SourceOptions = SourceOptions()) -> list[Source]:  # noqa: B008 (frozen)
    """Sources from a TSV: a ``path`` column (relative to the manifest's folder) and any
    :class:`SourceOptions` field as a column (``counts_layer``, ``label_column``, ``study``,
    ...);
    an empty cell keeps the default."""
    path = Path(path)
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    known = set(SourceOptions.__dataclass_fields__)
    unknown = [c for c in table.columns if c != "path" and c not in known]
    if "path" not in table.columns or unknown:
        raise IngestError(f"{path}: a manifest needs a 'path' column and option columns among "
                          f"{sorted(known)}; unknown: {unknown}")
    sources = []
    for row in table.to_dict("records"):
        file = Path(row.pop("path"))
        overrides = {k: v for k, v in row.items() if v.strip()}
        sources.append(Source(file if file.is_absolute() else path.parent / file,
                              replace(defaults, **overrides)))
    return sources


# --------------------------------------------------------------------------- the build


@dataclass(frozen=True)
class BuildSummary:
    """What a build wrote."""

    uri: str
    n_cells: int
    n_genes: int
    n_files: int
    n_studies: int
    n_samples: int
    n_labelled: int
    seconds: float
    files: tuple[tuple[str, int, str], ...]  # (file, cells, counts element) of this run


def build_store(out: str | os.PathLike, sources: Sequence[Source | str | os.PathLike],
                options: BuildOptions = BuildOptions(), *, append: bool = False,
                overwrite: bool = False) -> BuildSummary:
    """Build (or extend) a CellArr store at ``out`` from h5ad ``sources``.

    Args:
        out: a local folder: absent or empty (new store), or a store with ``append``
            (add cells) or ``overwrite`` (replace it). Anything else is refused.
        sources: the files and how to read each (see :func:`find_sources`,
            :func:`read_manifest`); a plain path is read with the default options.
        options: how to write.
        append: add the sources' cells to the store at ``out`` (new genes extend the gene
            space at its end; the store's own value type and counts location are kept).
        overwrite: replace the store at ``out`` (only a store: other folders are never
            removed).

    Returns:
        A :class:`BuildSummary`. ``out`` holds either the complete new store or what it held
        before: the build happens in ``out.partial`` and is swapped in at the end.

    Raises:
        IngestError: a bad input or output, naming it and the option that fixes it.
    """
    started = time.perf_counter()
    if "://" in str(out):
        raise IngestError(f"{out}: build_store writes a local folder (the finished store is "
                          "renamed into place); build locally, then copy it to object storage")
    out = Path(out)
    sources = [s if isinstance(s, Source) else Source(Path(s)) for s in sources]
    if not sources:
        raise IngestError("no input files given")
    partial, replaced = _sibling(out, "partial"), _sibling(out, "replaced")
    _recover(out, partial, replaced)
    existing = _existing_store(out, append, overwrite)
    bar_files = tqdm(total=len(sources), desc="inspecting files", unit=" file",
                     disable=not options.progress)
    with bar_files:
        infos = []
        for source in sources:
            infos.append(inspect_file(source, CHECK_ROWS))
            bar_files.update()
    _check_study_names(infos)
    genes, columns = gene_space(infos, existing.gene_symbols if existing else ())
    if existing is not None:
        options = _append_options(existing, options)
    try:
        record, ctx = _prepare(out, partial, existing, options)
        converted = Converted(set() if existing is None else set(map(tuple, _read_whole(
            existing, "sample_metadata", ctx)[[STUDY_COLUMN, SAMPLE_COLUMN]].to_numpy())))
        _write_counts(partial, infos, columns, len(genes), options, converted,
                      existing.n_cells if existing else None, ctx)
        totals = _write_tables(partial, converted, genes, existing, ctx)
        record["files"] += [{"path": str(i.source.path.resolve()), "cells": i.n_cells,
                             "counts": i.counts, "options": asdict(i.source.options)}
                            for i in infos]
        record.update(status="complete", n_cells=totals["n_cells"], n_genes=len(genes))
        (partial / BUILD_RECORD).write_text(json.dumps(record, indent=1, default=str))
        CellArrStore(partial)  # the store must open before it takes the place of out
        _swap(partial, out, replaced)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return BuildSummary(
        uri=str(out), n_genes=len(genes), n_files=len(record["files"]), **totals,
        seconds=time.perf_counter() - started,
        files=tuple((i.name, i.n_cells, i.counts) for i in infos))


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.name}.{suffix}")


def _recover(out: Path, partial: Path, replaced: Path) -> None:
    """Clean up after an interrupted build: a leftover ``.partial`` is removed; a
    ``.replaced`` store (a swap cut between its two renames) is put back if ``out`` is gone."""
    if replaced.exists() and (replaced / REPLACED_MARK).exists():
        if out.exists():
            shutil.rmtree(replaced)
        else:
            (replaced / REPLACED_MARK).unlink()
            replaced.rename(out)
    if partial.exists():
        if not (partial / BUILD_RECORD).exists():
            raise IngestError(f"{partial} exists but was not made by build_store; "
                              "move or remove it (it is where the store is built)")
        shutil.rmtree(partial)


def _existing_store(out: Path, append: bool, overwrite: bool) -> CellArrStore | None:
    """The store to append to, or None for a new build; refuses every other output."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not out.is_dir():
        raise IngestError(f"{out} is a file; pass a folder for the store")
    try:
        store = CellArrStore(out)
    except StoreError as exc:
        raise IngestError(f"{out} is a non-empty folder that is not a store; pass a new or "
                          "empty folder (nothing there is removed, even with --overwrite)"
                          ) from exc
    if overwrite:
        return None
    if not append:
        raise IngestError(f"{out} already holds a store ({store.n_cells} cells); pass --append "
                          "to add these files to it, --overwrite to replace it, or another "
                          "output folder")
    lacking = [c for c in BUILT_CELL_COLUMNS if c not in store.columns("cell_metadata")]
    if lacking:
        raise IngestError(f"{out} was not built by build_store (its cell_metadata lacks "
                          f"{lacking}); appending needs one that was. Build a new store.")
    return store


def _check_study_names(infos: Sequence[FileInfo]) -> None:
    """Two files with one stem would silently become one study: refuse."""
    stems: dict[str, str] = {}
    for info in infos:
        if info.study_column is None and info.source.options.study is None:
            if info.stem in stems:
                raise IngestError(f"{stems[info.stem]} and {info.name} would both be study "
                                  f"{info.stem!r} (one study per file, named by the file); "
                                  "rename one, pass --study-column, or set study in a "
                                  "--manifest")
            stems[info.stem] = info.name


def _append_options(existing: CellArrStore, options: BuildOptions) -> BuildOptions:
    """Appending keeps the store's counts location and value type."""
    dtype = np.dtype(existing.counts_array().schema.attr(0).dtype).name
    if dtype not in DTYPES:
        raise IngestError(f"{existing.uri} stores counts as {dtype}; appending needs a store "
                          f"with {' or '.join(DTYPES)} counts")
    existing.close()
    return replace(options, value_dtype=dtype,
                   counts_location=os.path.relpath(existing.counts_uri, existing.uri))


def _prepare(out: Path, partial: Path, existing: CellArrStore | None,
             options: BuildOptions) -> tuple[dict, tiledb.Ctx]:
    """Create ``partial`` (a hard-linked copy of the store when appending) and mark it ours.

    Returns the build record and the TileDB context to write with: a context of our own,
    never TileDB's default one, which would make forked DataLoader workers of the same
    process hang (docs/architecture.md, "The loader").
    """
    record = {"scimtrain": __version__, "status": "building", "files": []}
    if existing is None:
        _, ctx = fresh_store(partial, False, options.counts_location)
    else:
        ctx = tiledb.Ctx()
        _link_copy(out, partial)
        if (partial / BUILD_RECORD).exists():
            record = json.loads((partial / BUILD_RECORD).read_text()) | {"status": "building"}
            (partial / BUILD_RECORD).unlink()  # a hard link: rewrite, never edit in place
    record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (partial / BUILD_RECORD).write_text(json.dumps(record, indent=1, default=str))
    return record, ctx


def _link_copy(src: Path, dst: Path) -> None:
    """Copy a folder with hard links where the file system allows (TileDB writes new files and
    unlinks old ones but never edits a file in place, so the copies stay independent)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def _write_counts(partial: Path, infos: Sequence[FileInfo], columns: Sequence[np.ndarray],
                  n_genes: int, options: BuildOptions, converted: Converted,
                  first_row: int | None, ctx: tiledb.Ctx) -> None:
    """Stream every file's counts into the counts array (from ``first_row`` when appending),
    collecting the cell and sample rows into ``converted``."""
    total = sum(i.n_cells for i in infos)
    bar_files = tqdm(total=len(infos), desc="files", unit=" file", position=0,
                     disable=not options.progress)
    bar_cells = tqdm(total=total, desc="cells", unit=" cells", position=1, leave=True,
                     disable=not options.progress)

    def chunks() -> Iterator[sp.csr_matrix]:
        for info, cols in zip(infos, columns):
            bar_files.set_postfix_str(info.source.path.name)
            yield from _convert(info, cols, n_genes, options, converted, bar_cells)
            bar_files.update()

    with bar_files, bar_cells:
        write_counts(join_uri(str(partial), options.counts_location), chunks(), n_genes,
                     value_dtype=DTYPES[options.value_dtype], capacity=options.capacity,
                     first_row=first_row, ctx=ctx)


def _convert(info: FileInfo, columns: np.ndarray, n_genes: int, options: BuildOptions,
             out: Converted, bar: tqdm) -> Iterator[sp.csr_matrix]:
    """Yield one file's counts in store columns, chunk by chunk, as ``options`` say; collect
    its cell rows."""
    yield from convert(info, columns, n_genes, out, bar, chunk_cells=options.chunk_cells,
                       maximum=np.iinfo(DTYPES[options.value_dtype]).max,
                       mt_prefix=options.mt_prefix)


def _write_tables(partial: Path, converted: Converted, genes: list[str],
                  existing: CellArrStore | None, ctx: tiledb.Ctx) -> dict[str, int]:
    """Write cell_metadata, gene_annotation and sample_metadata; returns the whole store's
    numbers of cells, studies, samples and labelled cells."""
    cells = pd.concat(converted.cells, ignore_index=True)
    samples = pd.DataFrame(
        [(study, sample, "; ".join(sorted(d - {MISSING_LABEL}) or [MISSING_LABEL]))
         for (study, sample), d in converted.diseases.items()],
        columns=[STUDY_COLUMN, SAMPLE_COLUMN, DISEASE_COLUMN])
    if existing is not None:
        old_cells = _read_whole(existing, "cell_metadata", ctx)[list(BUILT_CELL_COLUMNS)]
        cells = pd.concat([old_cells, cells], ignore_index=True)
        samples = pd.concat([_read_whole(existing, "sample_metadata", ctx), samples],
                            ignore_index=True)
        for frame in ("cell_metadata", "gene_annotation", "sample_metadata"):
            shutil.rmtree(partial / frame)
    write_frames(str(partial), cells, genes, samples, ctx)
    return {"n_cells": len(cells), "n_studies": samples[STUDY_COLUMN].nunique(),
            "n_samples": len(samples),
            "n_labelled": int((cells[LABEL_COLUMN] != MISSING_LABEL).sum())}


def _read_whole(store: CellArrStore, frame: str, ctx: tiledb.Ctx) -> pd.DataFrame:
    """Every row of a frame (``read_frame`` drops rows with a missing value)."""
    with tiledb.open(join_uri(store.uri, frame), ctx=ctx) as arr:
        table = arr.df[:]
    return table.reset_index(drop=True)


def _swap(partial: Path, out: Path, replaced: Path) -> None:
    """Put the finished store at ``out``; an old store there is moved aside, then removed."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        (out / REPLACED_MARK).touch()  # lets a rerun tell this folder is ours to restore
        out.rename(replaced)
        partial.rename(out)
        shutil.rmtree(replaced)
    else:
        partial.rename(out)
