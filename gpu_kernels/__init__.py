"""Triton kernels of the gathered path (installed as ``dynprune.kernels``; needs the ``triton`` extra).

Modules (imported lazily by their users, so that ``TRITON_INTERPRET=1`` can still
be set before any kernel is decorated):

- ``common``         keep lists, input checks, where kernels can run (CUDA / interpreter)
- ``gathered_gemm``  the two GEMMs over kept units: expand (+ fused activation) and contract
- ``gated_ffn``      gated FFN (GELU or SwiGLU) over each sample's kept slices
- ``gated_attention`` Q/K/V/O over kept heads + attention that skips the rest (padding, causal, GQA)
- ``gated_decode``   one-token attention against a KV cache for kept heads (split-KV)
- ``dispatch``       ``gathered_layer``: one gated encoder layer (GateConfig(backend="triton"))
- ``compile_check``  compile every kernel for sm_80 / sm_90 without a GPU
- ``bench``          ``dynprune bench kernels``
"""
