"""Execution backends of the dual-binary ops (installed as ``dbllm_compile.backends``).

Today every device runs the pure-PyTorch reference registered as the default implementation
of ``torch.ops.dbllm.db_linear`` / ``db_linear_train`` in :mod:`dbllm_compile.ops` (the CPU
path and the numerics oracle). Device kernels register here per dispatch key, e.g.
``dbllm_compile.ops.db_linear.register_kernel("cuda")(triton_db_linear)``, and the
``torch.compile`` backend ``"dbllm"`` lives here too; neither exists yet.
"""
