"""The add-ons people download for a model: LoRA / LyCORIS networks, textual-inversion embeddings and VAE
files. Each is read through the same safe reader as checkpoints and applied to a loaded Pipeline."""
