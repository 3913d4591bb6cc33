"""Serve llama-architecture GGUF files (the bundled SmolLM2 among them) with mlx_lm.

MLX reads GGUF itself (``mx.load``): Q4_0, Q4_1 and Q8_0 tensors come back as MLX affine
quantized triples (``X.weight`` uint32, ``X.scales``, ``X.biases``, groups of 32), float
tensors as arrays, and the metadata as a dict. What MLX does *not* do is turn that into
something mlx_lm can run. This module does the rest:

- renames the llama.cpp tensors to mlx_lm's llama names and undoes the row permutation the
  GGUF converter applied to q and k (llama.cpp rotates interleaved pairs, HF/mlx_lm rotate
  halves);
- rebuilds the byte-level BPE tokenizer (vocab, merges, pre-tokenizer, special tokens, chat
  template) as a ``tokenizers`` / ``transformers`` tokenizer wrapped in mlx_lm's
  ``TokenizerWrapper``;
- writes an HF-style config so the same model can be exported as an MLX model directory
  that ``mlx_lm.load`` and ``mlx_lm.server`` accept.

What MLX reads unfaithfully is refused rather than served wrong, see :func:`read_gguf`.

Modules: ``reader`` (locate the bundled file, walk and check the header, ``mx.load``),
``weights`` (HF-style llama config, tensor renaming, un-permuting, dequantizing),
``tokenizer`` (the byte-level BPE tokenizer from the metadata), ``convert`` (all three
together: :func:`load_gguf`) and ``export`` (an MLX model directory on disk).
"""

from .convert import load_gguf
from .export import export_mlx_dir
from .reader import bundled_gguf_path, header_summary, read_gguf

__all__ = ["bundled_gguf_path", "export_mlx_dir", "header_summary", "load_gguf", "read_gguf"]
