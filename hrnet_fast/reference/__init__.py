"""Plain-PyTorch pose HRNet, state-dict compatible with the official one: what every test compares against."""
from hrnet_fast.reference.blocks import BasicBlock, Bottleneck
from hrnet_fast.reference.config import HRNetConfig, StageConfig, parse_config
from hrnet_fast.reference.hr_module import HighResolutionModule
from hrnet_fast.reference.hrnet import (
    PoseHighResolutionNet,
    get_pose_net,
    pose_hrnet_w32,
    pose_hrnet_w48,
    tiny_pose_hrnet,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "HRNetConfig",
    "HighResolutionModule",
    "PoseHighResolutionNet",
    "StageConfig",
    "get_pose_net",
    "parse_config",
    "pose_hrnet_w32",
    "pose_hrnet_w48",
    "tiny_pose_hrnet",
]
