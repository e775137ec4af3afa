"""fastres: fused ResNet kernels. This module is the public API (the top of the library's layers:
kernels -> launch -> ops -> nn -> convert -> here; see docs/architecture.md).

Public API:
  optimize(model) / restore(model)          swap ResNet blocks and conv+BN(+ReLU) chains in place
  fusion_report(model)                      what optimize() fused and what it left alone, and why
  FusedConvBNReLU, FusedBasicBlock, FusedBottleneck   drop-in modules (torchvision names)
  conv_bn_act(...)                          the fused convolution as a function
  fold_conv_bn(...)                         BatchNorm folding (fp32 math)
  set_fp32_precision(...) / get_fp32_precision()
"""
from pathlib import Path as _Path

# Installed, kernels/ is the subpackage fastres.kernels (setup.py's package_dir). Used straight
# from a source checkout (PYTHONPATH=.), let the checkout's top-level kernels/ play that role.
if not (_Path(__file__).parent / "kernels").is_dir() and \
        (_Path(__file__).parent.parent / "kernels" / "conv.py").is_file():
    __path__.append(str(_Path(__file__).parent.parent))

from fastres.convert import FusionReport, fusion_report, optimize, refresh, restore  # noqa: E402
from fastres.nn.blocks import FusedBasicBlock, FusedBottleneck  # noqa: E402
from fastres.nn.folding import fold_conv_bn  # noqa: E402
from fastres.nn.modules import FoldedBatchNorm2d, FoldedReLU, FusedConv2d, FusedConvBNReLU  # noqa: E402
from fastres.ops.conv_bn_act import conv_bn_act, get_fp32_precision, set_fp32_precision  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "optimize", "restore", "refresh", "fusion_report", "FusionReport",
    "FusedConvBNReLU", "FusedBasicBlock", "FusedBottleneck", "FusedConv2d", "FoldedBatchNorm2d",
    "FoldedReLU", "conv_bn_act", "fold_conv_bn", "set_fp32_precision", "get_fp32_precision",
]
