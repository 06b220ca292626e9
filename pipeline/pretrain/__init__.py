"""Pretraining: the masked autoencoder under its objective (MAE, NIM, DMAE, MIMIR) as an engine
task, and the export of its weights in MAE's layout."""
