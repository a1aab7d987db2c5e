"""hrnet_fast: fused CPU, CUDA and Triton kernels for HRNet inference."""
from hrnet_fast import _extension
from hrnet_fast.ops import conv_bias_act, fuse_multi_res

__all__ = ["conv_bias_act", "fuse_multi_res"]
__version__ = "0.1.0"
