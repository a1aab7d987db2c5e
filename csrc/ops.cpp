// The hrnet_fast op library: one schema per op. Kernels register per backend in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; argument checks, fake (meta) and autograd live in Python
// (hrnet_fast/ops/_meta.py; conv3x3_winograd's in hrnet_fast/ops/winograd.py), the Triton kernels in
// hrnet_fast/triton/ (conv.py, fusion.py).
#include <Python.h>
#include <torch/library.h>

// Importing hrnet_fast._C as a Python module runs the static registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hrnet_fast, m) {
  // act(conv2d(x, weight, stride, padding) + bias + residual)
  m.def(
      "conv_bias_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "Tensor? residual=None, bool relu=True) -> Tensor");
  // conv_bias_act written into out (the output's sizes, overlapping no input; a mutation, so nothing is
  // returned, as torch.library wants of custom ops): CPU only
  m.def(
      "conv_bias_act_into(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "Tensor? residual, bool relu, Tensor(a!) out) -> ()");
  // conv_bias_act of one conv whose output channels are split into len(channels) outputs, output s
  // act_s(its channels of conv2d(x, weight) + bias + residuals[s]), act_s a ReLU where relus[s]: CPU only
  m.def(
      "conv_bias_act_split(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[] channels, "
      "Tensor?[] residuals, bool[] relus) -> Tensor[]");
  // act(base + bias + sum_k interpolate(conv1x1(lowres[k], weights[k]), size=base.shape[-2:], mode,
  // align_corners)), mode "nearest" or "bilinear"
  m.def(
      "fuse_multi_res(Tensor base, Tensor[] lowres, Tensor[] weights, Tensor? bias, "
      "bool relu=True, str mode=\"nearest\", bool align_corners=False) -> Tensor");
  // the segmentation HRNet's head: conv2d(relu(conv2d(x, weight) + bias + sum_k bilinear(conv1x1(lowres[k],
  // weights[k]), size=x.shape[-2:], align_corners)), classifier) + classifier_bias, every conv 1x1; the
  // sum's channels never written out: CPU only
  m.def(
      "seg_head(Tensor x, Tensor[] lowres, Tensor weight, Tensor bias, Tensor[] weights, Tensor classifier, "
      "Tensor? classifier_bias, bool align_corners) -> Tensor");
  // act(conv2d(x, w, stride=1, padding=1) + bias + residual) for a 3x3 w by Winograd F(m x m, 3 x 3),
  // w given transformed (hrnet_fast.ops.winograd.transform_weight; tile=0) or dense, transformed per call
  // with m = tile: CPU only; cuDNN picks Winograd itself on CUDA.
  m.def(
      "conv3x3_winograd(Tensor x, Tensor weight, int out_channels, Tensor? bias, Tensor? residual=None, "
      "bool relu=True, int tile=0) -> Tensor");
  // n/2 ResNet BasicBlocks with identity shortcuts, x <- relu(conv(relu(conv(x, w[2k]) + b[2k]), w[2k+1]) +
  // b[2k+1] + x), every conv 3x3 C -> C with its dense weight, by Winograd F(tile x tile, 3 x 3) as
  // conv3x3_winograd: CPU only, in one parallel region.
  m.def("winograd_blocks(Tensor x, Tensor[] weights, Tensor[] biases, int tile) -> Tensor");
  // an HR module's branches, branch b the winograd_blocks chain of xs[b] with the next convs[b] weights and
  // biases and its tile: side by side on shares of the threads where each gets at least 2. CPU only.
  m.def("winograd_branches(Tensor[] xs, Tensor[] weights, Tensor[] biases, int[] convs, int[] tiles) -> Tensor[]");
  // G w G^T of a [C_out, C_in, 3, 3] weight, packed for conv3x3_winograd: [(m+2)^2, ceil(C_out/16), C_in, 16]
  m.def("winograd_weight(Tensor weight, int m) -> Tensor");
}
