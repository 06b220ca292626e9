"""The pretraining engine: DeepSpeed ZeRO, sharded checkpoints with exact and elastic resume."""
