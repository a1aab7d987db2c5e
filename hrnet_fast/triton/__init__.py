"""Triton kernels, one file per op; imported lazily so `import hrnet_fast` never imports triton."""
