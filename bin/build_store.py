#!/usr/bin/env python
"""Build a CellArr training store from h5ad files, for `bin/train.py --tiledb OUT`.

    python bin/build_store.py OUT data/*.h5ad --label-column cell_type_ontology_term_id
    python bin/build_store.py OUT data/ --study-column dataset_id --sample-column donor_id
    python bin/build_store.py OUT more.h5ad --append
    python bin/build_store.py OUT --manifest files.tsv

Each file's raw counts (X, a layer or raw.X: integers, checked), label, study and sample become
the store's cell_metadata (cellTypeOntologyID, datasetID, sampleID, plus the QC columns
total_counts, n_genes_by_counts, pct_counts_mt, predicted_doublets, and cell_id, source_file);
the genes are the union of the files' genes (first-seen order); sample_metadata holds
datasetID, sampleID, disease. The store is built in OUT.partial and renamed to OUT when
complete. Options taking a COLUMN accept several, comma-separated: the first a file has is used.
"""

from __future__ import annotations

import argparse
import sys

from scimtrain.ingest import (
    BuildOptions,
    IngestError,
    SourceOptions,
    build_store,
    find_sources,
    read_manifest,
)


def parser() -> argparse.ArgumentParser:
    defaults = SourceOptions()
    build = BuildOptions()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="store folder to create (absent or empty), or to --append to")
    p.add_argument("inputs", nargs="*", help="h5ad files, or folders of *.h5ad files")
    p.add_argument("--manifest", metavar="TSV",
                   help="a TSV with a 'path' column (relative to the TSV) and per-file option "
                        "columns: counts_layer, gene_column, label_column, study_column, study, "
                        "sample_column, sample, disease_column, disease, doublet_column; empty "
                        "cells keep the command-line value")
    files = p.add_argument_group("what each file holds")
    files.add_argument("--counts-layer", default=defaults.counts_layer, metavar="WHERE",
                       help="where the raw integer counts are: X, raw.X, or a layer name; "
                            "'auto' takes the first of X, layers counts/raw_counts, raw.X that "
                            "holds integers (default: %(default)s)")
    files.add_argument("--gene-column", default=defaults.gene_column, metavar="COLUMN",
                       help="var column with gene symbols (default: the var index)")
    files.add_argument("--label-column", default=",".join(defaults.label_column),
                       metavar="COLUMN", help="obs column with cell labels: CL ids, or plain "
                       "labels for training without the ontology; missing labels become "
                       "'nan' (default: %(default)s)")
    files.add_argument("--study-column", metavar="COLUMN",
                       help="obs column with the study (default: one study per file, named "
                            "by the file name without .h5ad)")
    files.add_argument("--sample-column", metavar="COLUMN",
                       help="obs column with the sample (default: one sample per study)")
    files.add_argument("--disease-column", metavar="COLUMN",
                       help="obs column with the disease, written per sample to "
                            "sample_metadata; samples with cancer terms are excluded from "
                            "training by default (default: 'nan' for every sample)")
    files.add_argument("--doublet-column", metavar="COLUMN",
                       help="obs column flagging doublets (bool, 0/1, doublet/singlet) "
                            "(default: predicted_doublets = 0)")
    store = p.add_argument_group("the store")
    store.add_argument("--append", action="store_true",
                       help="add the files to the store at OUT (built by this tool); new "
                            "genes are added at the end of its gene space")
    store.add_argument("--overwrite", action="store_true",
                       help="replace the store at OUT (never removes a folder that is not a "
                            "store)")
    store.add_argument("--mt-prefix", default=build.mt_prefix, metavar="PREFIX",
                       help="prefix of mitochondrial gene symbols, any case "
                            "(default: %(default)s)")
    store.add_argument("--value-dtype", default=build.value_dtype, choices=["uint32", "uint16"],
                       help="on-disk count type; uint16 halves the value bytes and refuses "
                            "counts above 65535 (default: %(default)s)")
    store.add_argument("--counts-location", default=build.counts_location,
                       choices=["counts", "assays/counts"],
                       help="where the counts array goes: SCimilarity's 'counts' or "
                            "cellarr's 'assays/counts' (default: %(default)s)")
    store.add_argument("--chunk-cells", type=int, default=build.chunk_cells, metavar="N",
                       help="cells read, checked and written at a time; bounds memory "
                            "(default: %(default)s)")
    store.add_argument("--capacity", type=int, default=build.capacity, metavar="N",
                       help="non-zeros per TileDB data tile (default: %(default)s)")
    store.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)  # options may sit between the paths
    source_options = SourceOptions(
        counts_layer=args.counts_layer, gene_column=args.gene_column,
        label_column=args.label_column, study_column=args.study_column,
        sample_column=args.sample_column, disease_column=args.disease_column,
        doublet_column=args.doublet_column)
    options = BuildOptions(mt_prefix=args.mt_prefix, chunk_cells=args.chunk_cells,
                           value_dtype=args.value_dtype, counts_location=args.counts_location,
                           capacity=args.capacity, progress=not args.no_progress)
    try:
        sources = find_sources(args.inputs, source_options) if args.inputs else []
        if args.manifest:
            sources += read_manifest(args.manifest, source_options)
        if not sources:
            raise IngestError("no input: give h5ad files or folders, or --manifest")
        summary = build_store(args.out, sources, options, append=args.append,
                              overwrite=args.overwrite)
    except IngestError as exc:
        print(f"build_store: error: {exc}", file=sys.stderr)
        return 2
    for name, cells, counts in summary.files:
        print(f"  {name}: {cells} cells, counts from {counts}")
    print(f"wrote {summary.uri}: {summary.n_cells} cells ({summary.n_labelled} labelled) x "
          f"{summary.n_genes} genes, {summary.n_studies} studies, {summary.n_samples} samples, "
          f"{summary.n_files} files, in {summary.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
