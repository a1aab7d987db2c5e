"""The two fused ops of hrnet_fast, each with a plain-PyTorch reference beside it."""
from hrnet_fast.ops.conv_bias_act import conv_bias_act, conv_bias_act_reference
from hrnet_fast.ops.fuse_multi_res import fuse_multi_res, fuse_multi_res_reference

__all__ = ["conv_bias_act", "conv_bias_act_reference", "fuse_multi_res", "fuse_multi_res_reference"]
