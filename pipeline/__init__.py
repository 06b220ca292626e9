"""The training pipeline: data loading, models, objectives, engine and checkpoints."""
