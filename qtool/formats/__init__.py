"""On-disk contracts, one module each: what a writer writes is what its reader reads, and both import it from here.

- ``run_dir``: the run directory's layout (stage directories, ``run.json``, where the packed model lives);
- ``calibration``: the calibration windows file;
- ``layers``: the quantize stage's per-layer checkpoints (integers, scales, and the facts pack needs);
- ``outliers``: the outlier-statistics report (``stats.json`` + channel absmax vectors);
- ``online``: the description of what runs online in a model (rotations, dynamic quantizers) in ``config.json``
  and its tensors file;
- ``intpack``: dense bit-packing of small integers into int32 words;
- ``hf_checkpoint``: a Hugging Face checkpoint directory (safetensors shards, index, config.json);
- ``compressed_tensors``: the compressed-tensors layout of quantized linears, its ``quantization_config``, and the
  packed-checkpoint writer and decoder;
- ``pack_job`` / ``registry``: what the pack stage hands a packed-format writer, and the table of writers
  (``PACKED_FORMATS``) whose keys ``pack.format`` takes.

Nothing here imports a stage: stages, loaders and the CLI import these contracts, never the reverse.
"""
