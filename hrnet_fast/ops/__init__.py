"""The fused ops of hrnet_fast, each with a plain-PyTorch reference beside it (conv3x3_winograd's is
conv_bias_act_reference with stride 1 and padding 1)."""
from hrnet_fast.ops.conv3x3_winograd import conv3x3_winograd
from hrnet_fast.ops.conv_bias_act import conv_bias_act, conv_bias_act_reference
from hrnet_fast.ops.fuse_multi_res import fuse_multi_res, fuse_multi_res_reference

__all__ = ["conv3x3_winograd", "conv_bias_act", "conv_bias_act_reference", "fuse_multi_res", "fuse_multi_res_reference"]
