"""scimtrain: SCimilarity-style metric learning on CellArr/TileDB single-cell atlases."""

__version__ = "0.1.0"
