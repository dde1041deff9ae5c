"""FX graph passes (installed as ``dbllm_compile.passes``).

- :mod:`~dbllm_compile.passes.export`: ``torch.export`` with dynamic batch/sequence.
- :mod:`~dbllm_compile.passes.linear_match`: find linear nodes in any architecture.
- :mod:`~dbllm_compile.passes.graph_analysis`: networkx analyses (heads, shared inputs, blocks).
- :mod:`~dbllm_compile.passes.quantize_linears`: rewrite linears into the training op.
- :mod:`~dbllm_compile.passes.pack_linears`: rewrite the training op into the packed deploy op.
- :mod:`~dbllm_compile.passes.activation_quant`: insert the shared 4-bit activation quantizers.
- :mod:`~dbllm_compile.passes.int_activations`: deployed W(1+1)A4 graphs: ``act_quant`` +
  ``db_linear`` into ``act_quant_int`` + ``db_linear_a4`` (int8 codes between the ops).
- :mod:`~dbllm_compile.passes.dtype_assertions`: remove the ``aten._assert_tensor_metadata``
  nodes of an exported graph, so it can run under bf16 autocast (``DistillConfig.autocast``).

Invariants every pass keeps: ``node.meta["val"]`` of a replaced node is carried to its
replacement (same shape and dtype), no aliasing is introduced, and the graph is linted and the
module recompiled before it is returned.
"""
