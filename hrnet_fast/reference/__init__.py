"""Plain-PyTorch pose and segmentation HRNets, state-dict compatible with the official ones: what every test compares against."""
from hrnet_fast.reference.blocks import BasicBlock, Bottleneck
from hrnet_fast.reference.config import HRNetConfig, SegHRNetConfig, StageConfig, parse_config, parse_seg_config
from hrnet_fast.reference.hr_module import HighResolutionModule
from hrnet_fast.reference.hrnet import (
    PoseHighResolutionNet,
    get_pose_net,
    pose_hrnet_w32,
    pose_hrnet_w48,
    tiny_pose_hrnet,
)
from hrnet_fast.reference.seg_hrnet import SegHighResolutionNet, get_seg_model, seg_hrnet_w48, tiny_seg_hrnet

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "HRNetConfig",
    "HighResolutionModule",
    "PoseHighResolutionNet",
    "SegHRNetConfig",
    "SegHighResolutionNet",
    "StageConfig",
    "get_pose_net",
    "get_seg_model",
    "parse_config",
    "parse_seg_config",
    "pose_hrnet_w32",
    "pose_hrnet_w48",
    "seg_hrnet_w48",
    "tiny_pose_hrnet",
    "tiny_seg_hrnet",
]
