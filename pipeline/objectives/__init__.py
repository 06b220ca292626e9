"""Pretraining objectives: MAE, NIM, DMAE and MIMIR over one masked autoencoder.

Each is a small class with one interface: `objective(model, images01, generator)` takes a
batch of [0, 1] images and a seeded generator on the batch's device, and returns the loss and
a dict of detached metric tensors. `robustmim.pipeline.objectives.registry.build_objective(cfg)` picks one
by name. (This file imports nothing: the configs in `config.py` load without torch, so a command
can check its settings before paying for torch's import.)
"""
