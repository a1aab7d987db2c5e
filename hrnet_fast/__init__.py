"""hrnet_fast: fused CPU, CUDA and Triton kernels for HRNet inference."""
from hrnet_fast import _extension
from hrnet_fast.checkpoint import CheckpointMismatchError, load_checkpoint
from hrnet_fast.ops import conv_bias_act, fuse_multi_res
from hrnet_fast.convert import ConversionError, optimize
from hrnet_fast.reference import get_pose_net, pose_hrnet_w32, pose_hrnet_w48
from hrnet_fast.reference import get_seg_model, seg_hrnet_w48

__all__ = [
    "CheckpointMismatchError",
    "ConversionError",
    "conv_bias_act",
    "fuse_multi_res",
    "get_pose_net",
    "get_seg_model",
    "load_checkpoint",
    "optimize",
    "pose_hrnet_w32",
    "pose_hrnet_w48",
    "seg_hrnet_w48",
]
__version__ = "0.1.0"
