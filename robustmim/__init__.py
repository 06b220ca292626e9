"""robustmim: robust masked-image-modeling pretraining at cluster scale.

This package holds what every stage shares: the `robustmim` command, typed configuration,
provenance records and atomic file writes. The stages live in their own top-level packages:
`shards` (build and verify WebDataset shards), `pipeline` (data, models, objectives, engine),
`slurm` (launching) and `eval` (attacks, certification, reports).
"""

__version__ = "0.1.0"
