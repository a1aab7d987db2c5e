"""Triton kernels, one file per op (conv.py: conv_bias_act_triton, fusion.py: fuse_multi_res_triton).

They import triton, so nothing imports them but hrnet_fast.ops._backend.define_triton_ops, on the
first use of the triton backend: `import hrnet_fast` never imports triton. They import only the
shared op definitions (hrnet_fast/ops/_meta.py), never the functional API.
"""
