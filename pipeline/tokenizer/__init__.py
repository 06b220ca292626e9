"""`robustmim tokenizer`: a VQGAN trained on the shards, the discretizer DAT fine-tunes through."""
