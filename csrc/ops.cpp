// Schemas of resnet_fused's ops, registered with the PyTorch dispatcher.
// Kernels live per backend (cpu/, cuda/); fake kernels for tracing live in
// resnet_fused/ops.py.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cpu/brgemm.h"
#include "cpu/conv1x1.h"
#include "cpu/cpu_isa.h"
#include "cpu/grouped_conv.h"
#include "cpu/kernel_runs.h"
#include "cpu/stem_conv.h"
#include "cpu/winograd.h"
#include "fast_forward.h"
#include "op_plan.h"
#include "state_watch.h"

TORCH_LIBRARY(resnet_fused, m) {
  // act(conv2d(input, weight) + bias [+ residual]), act = relu or identity.
  // With BatchNorm folded into weight and bias this is conv-BN-ReLU, conv-BN and
  // conv-BN-add-ReLU. weight may be a pack_weight() result on CPU. On CPU the
  // convolution may be 3-D (5-D input and weight, stride/padding/dilation of 3).
  // assume_finite: the caller guarantees input and residual hold no NaN/Inf,
  // which spares the CPU kernel the scan it needs to propagate NaN through its
  // ReLU exactly (FusedResNet checks its own input once instead).
  m.def(
      "conv_bias_act(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
      "int[] stride, int[] padding, int[] dilation, int groups, *, bool relu=True, "
      "bool assume_finite=False) -> Tensor");
  // residual = relu(residual + conv2d(input, weight) + bias), in place: the end of
  // a residual block when the identity tensor is not needed afterwards.
  m.def(
      "conv_bias_add_relu_(Tensor(a!) residual, Tensor input, Tensor weight, Tensor? bias, "
      "int[] stride, int[] padding, int[] dilation, int groups, *, "
      "bool assume_finite=False) -> ()");
  m.def("add_relu(Tensor a, Tensor b) -> Tensor");
  // In-place ops return nothing: functionalization (torch.compile) supports
  // mutating custom ops only without aliased outputs.
  m.def("add_relu_(Tensor(a!) a, Tensor b) -> ()");
  // conv_bias_act for a 3x3, padding-1, ungrouped conv, computed by Winograd's
  // F(2x2, 3x3) or F(4x4, 3x3) at stride 1, F(2x2, 3x3) at stride 2, on CPU.
  // winograd_weight is resnet_fused.ops.winograd_weight(weight, tile, stride): the
  // weight in the Winograd domain, float32 [16 or 36, K / P, C, P] (stride 1) or
  // [4, 4, K / P, C, P] (stride 2) in panels of P output channels, or
  // [16, K / P, C/2, P, 2] bfloat16 (VNNI pairs, stride 1).
  m.def(
      "winograd_conv3x3(Tensor input, Tensor weight, Tensor winograd_weight, Tensor? bias, "
      "Tensor? residual, *, int stride=1, bool relu=True, bool assume_finite=False) -> Tensor");
  // conv_bias_act for a 3-D conv of 3x3 spatial taps (kt x 3 x 3, kt odd, stride 1,
  // padding (kt / 2, 1, 1), ungrouped; channels_last_3d) on CPU: each temporal tap a 2-D
  // winograd_conv3x3 over the frames, the taps summed before one output transform.
  // winograd_weight is resnet_fused.ops.winograd_weight(weight) of the 5-D weight: one
  // stride-1 winograd_conv3x3 weight per tap, stacked, [kt, ...].
  m.def(
      "winograd_conv3d(Tensor input, Tensor weight, Tensor winograd_weight, Tensor? bias, "
      "Tensor? residual, *, bool relu=True, bool assume_finite=False) -> Tensor");
  // conv_bias_act for a 1x1, unpadded, ungrouped conv, computed on CPU as one matrix
  // product on oneDNN's brgemm micro-kernel. weight_panels is
  // resnet_fused.ops.conv1x1_weight(weight): the weight in panels of P output channels,
  // [K / P, C, P], or [K / P, C/2, P, 2] bfloat16 (VNNI pairs).
  m.def(
      "conv1x1(Tensor input, Tensor weight, Tensor weight_panels, Tensor? bias, "
      "Tensor? residual, *, bool relu=True, int stride=1) -> Tensor");
  // conv_bias_act for a grouped 3x3, padding-1 conv (ResNeXt's), groups = C /
  // weight.size(1), computed on CPU by a direct kernel of ours. packed_weight is
  // resnet_fused.ops.grouped_conv_weight(weight, groups): [K / L, 9, C / groups, L], L =
  // max(K / groups, 16) output channels per block.
  m.def(
      "grouped_conv3x3(Tensor input, Tensor weight, Tensor packed_weight, Tensor? bias, "
      "Tensor? residual, *, int stride=1, bool relu=True) -> Tensor");
  // conv_bias_act for an ungrouped, undilated conv over few input channels (ResNet's
  // stem), stride (1, 1) or (2, 2), computed on CPU by a direct kernel of ours.
  // packed_weight is resnet_fused.ops.stem_conv_weight(weight): [R, C, S, K].
  m.def(
      "stem_conv(Tensor input, Tensor weight, Tensor packed_weight, Tensor? bias, "
      "Tensor? residual, *, int[2] stride, int[2] padding, bool relu=True) -> Tensor");
  // act(conv1x1(input) + conv1x1(input2, stride=stride2) + bias): two 1x1 convs with
  // the same output shape summed without storing either alone (ResNet's downsample and
  // the last conv of the block it belongs to).
  m.def(
      "conv1x1_sum(Tensor input, Tensor weight, Tensor weight_panels, Tensor input2, "
      "Tensor weight2, Tensor weight2_panels, Tensor? bias, *, int stride2=1, "
      "bool relu=True) -> Tensor");
  // residual = relu(residual + conv1x1(input) + bias), in place (stride 1).
  m.def(
      "conv1x1_add_relu_(Tensor(a!) residual, Tensor input, Tensor weight, "
      "Tensor weight_panels, Tensor? bias) -> ()");
  // A convolution's input patches as the rows of a matrix (CPU; channels_last [N, taps
  // * C, OH, OW], taps (kh, kw) in [tap_begin, tap_end)): the small convs that
  // conv1x1 then computes as one product.
  m.def(
      "im2col(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int[2] tap_begin, int[2] tap_end) -> Tensor");
  // max_pool2d(input, kernel_size, stride, padding) without the argmax indices
  // (CPU, float32 and bfloat16; dilation 1, floor rounding).
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  // linear(input.mean((2, 3)), weight, bias): ResNet's average pool and fc as one op
  // (CPU, float32).
  m.def("mean_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // Whether input holds no NaN or Inf (CPU): the check FusedResNet makes of its input
  // before running the kernels with assume_finite.
  m.def("all_finite(Tensor input) -> bool");
  // A copy of input in memory backed by transparent huge pages where the OS offers them
  // (CPU; for the large pre-transformed weights, when the model makes them).
  m.def("huge_page_copy(Tensor input, int huge_page_bytes) -> Tensor");
  // Re-lays a folded weight out for the backend's kernel, once, at fold time.
  // input_size is a representative input shape (the layout may depend on it).
  m.def(
      "pack_weight(Tensor weight, int[] stride, int[] padding, int[] dilation, int groups, "
      "int[] input_size) -> Tensor");
}

// The module exists so that `import resnet_fused._C` loads the library (and with
// it the registrations above); it also records what it was built against.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddFunctions(m, resnet_fused::state_watch_methods()) < 0 ||
      PyModule_AddFunctions(m, resnet_fused::op_plan_methods()) < 0 ||
      PyModule_AddFunctions(m, resnet_fused::fast_forward_methods()) < 0 ||
      PyModule_AddFunctions(m, resnet_fused::kernel_runs_methods()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  PyModule_AddStringConstant(m, "torch_version", TORCH_VERSION);
  // Read once, at import (RESNET_FUSED_CPU_ISA caps it).
  PyModule_AddStringConstant(m, "cpu_isa", resnet_fused::cpu_isa_name(resnet_fused::cpu_isa()));
  PyModule_AddIntConstant(m, "winograd_kernel", resnet_fused::winograd_kernel_available() ? 1 : 0);
  PyModule_AddIntConstant(m, "conv1x1_kernel", resnet_fused::brgemm_f32_available() ? 1 : 0);
  PyModule_AddIntConstant(m, "grouped_conv_kernel",
                          resnet_fused::grouped_conv_kernel_available() ? 1 : 0);
  PyModule_AddIntConstant(m, "stem_conv_kernel",
                          resnet_fused::stem_conv_kernel_available() ? 1 : 0);
  PyModule_AddIntConstant(m, "conv1x1_bf16_kernel",
                          resnet_fused::conv1x1_bf16_kernel_available() ? 1 : 0);
  PyModule_AddIntConstant(m, "winograd_bf16_kernel",
                          resnet_fused::winograd_bf16_kernel_available() ? 1 : 0);
#ifdef RESNET_FUSED_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
  PyModule_AddStringConstant(m, "cuda_archs", RESNET_FUSED_CUDA_ARCHS);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
  PyModule_AddStringConstant(m, "cuda_archs", "");
#endif
  // Whether the Hopper wgmma conv kernel was built (setup.py: 9.0a without plain 9.0).
#ifdef RESNET_FUSED_SM90A
  PyModule_AddIntConstant(m, "cuda_wgmma", 1);
#else
  PyModule_AddIntConstant(m, "cuda_wgmma", 0);
#endif
  // Whether CUTLASS's Hopper kernels were built (setup.py: 9.0a and
  // CUTLASS's headers found).
#if defined(RESNET_FUSED_SM90A) && defined(RESNET_FUSED_CUTLASS)
  PyModule_AddIntConstant(m, "cuda_cutlass", 1);
#else
  PyModule_AddIntConstant(m, "cuda_cutlass", 0);
#endif
  return m;
}
