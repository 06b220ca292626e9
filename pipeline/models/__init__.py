"""Models: the masked autoencoder every pretraining objective shares, built from timm's blocks."""
