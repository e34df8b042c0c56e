"""compressed-tensors checkpoints: ``layout`` (how quantized linears are stored, ``quantization_config``),
``writer`` (the pack stage's writer) and ``reader`` (qtool's decompressing loader)."""
