"""Column names, in one place: those of a store's frames and those of the selection's tables.

Store columns are the names SCimilarity's stores use (and ``bin/train.py``'s defaults);
``bin/build_store.py`` writes them, the synthetic stores have them, the default filter reads
them. Selection columns are those of :class:`~scimtrain.selection.Selection`'s ``train`` and
``val`` tables, whatever the store called them.
"""

# --------------------------------------------------------------------------- store columns
LABEL_COLUMN = "cellTypeOntologyID"  # Cell Ontology id, or MISSING_LABEL
STUDY_COLUMN = "datasetID"
SAMPLE_COLUMN = "sampleID"
DISEASE_COLUMN = "disease"  # in sample_metadata
QC_COLUMNS = ("total_counts", "n_genes_by_counts", "pct_counts_mt", "predicted_doublets")
# What the default selection reads from cell_metadata.
TRAINING_COLUMNS = (LABEL_COLUMN, STUDY_COLUMN, SAMPLE_COLUMN, *QC_COLUMNS)
# What bin/build_store.py writes to cell_metadata: the above and where each cell came from.
BUILT_CELL_COLUMNS = (*TRAINING_COLUMNS, "cell_id", "source_file")
MISSING_LABEL = "nan"  # how SCimilarity's stores spell a missing label
GENE_SYMBOL_COLUMN = "cellarr_gene_index"  # gene_annotation
CELLARR_SAMPLE_COLUMN = "cellarr_sample"  # the cellarr package's sample key

# The CELLxGENE Census schema's names for the same things: a SOMA source's defaults (keys:
# bin/train.py's flags). The disease column is "disease" in both.
CENSUS_COLUMNS = {"label_id_column": "cell_type_ontology_term_id", "study_column": "dataset_id",
                  "sample_column": "donor_id", "gene_column": "feature_name"}
CENSUS_UNLABELLED = "unknown"  # the Census's label of cells without a cell type

# --------------------------------------------------------------------------- selection tables
LABEL_ID, LABEL_NAME = "label_id", "label_name"
STUDY, SAMPLE = "study", "sample"
WEIGHT, LABEL_INT, STUDY_INT = "sampling_weight", "label_int", "study_int"
