"""The fused ops of hrnet_fast, each with a plain-PyTorch reference (conv3x3_winograd's is
conv_bias_act_reference with stride 1 and padding 1).

Modules: conv.py (conv_bias_act, prepack), fusion.py (fuse_multi_res), winograd.py
(conv3x3_winograd and its weight transforms), basic_blocks.py (winograd_blocks: a chain of
BasicBlocks in one op), reference.py (the references); what every backend
of an op shares (checks, fake, autograd) in _meta.py, the backend choice in _backend.py.
"""
from hrnet_fast.ops.conv import conv_bias_act
from hrnet_fast.ops.fusion import fuse_multi_res
from hrnet_fast.ops.reference import conv_bias_act_reference, fuse_multi_res_reference
from hrnet_fast.ops.winograd import conv3x3_winograd
from hrnet_fast.ops.basic_blocks import winograd_blocks, winograd_branches

__all__ = ["conv3x3_winograd", "conv_bias_act", "conv_bias_act_reference", "fuse_multi_res", "fuse_multi_res_reference",
           "winograd_blocks", "winograd_branches"]
