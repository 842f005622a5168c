// conv_bias_act's other convolutions (3x3 at stride 1 or 2, strided 1x1, dilated) on
// CUTLASS's Hopper implicit-GEMM convolution: TMA loads in im2col mode (no im2col
// buffer), a producer and a consumer warpgroup (wgmma), 128x128 tiles, 64 input
// channels per k-tile; CUTLASS's epilogue fusion computes relu(acc + res + bias) and
// stores with TMA. The 1x1 stride-1 convolutions take the plain GEMM of
// cutlass_gemm1x1_sm90.cu instead.
//
// Forced only (RESNET_FUSED_CUDA_TILE=CUTLASS, conv_bias_act.cpp) until measured on a
// GPU; built as the GEMM is (setup.py defines RESNET_FUSED_CUTLASS). CUTLASS 4.2's
// persistent (cooperative, ping-pong) schedules are not available for convolutions.

#include "launch.h"

#if defined(RESNET_FUSED_CUTLASS) && defined(RESNET_FUSED_SM90A)

#include "cutlass_common.cuh"  // first: it defines NDEBUG before CUTLASS's headers

#include <cutlass/kernel_hardware_info.hpp>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>

namespace resnet_fused {
namespace conv {
namespace {

template <typename T>
struct ImplicitGemm {
  using E = typename CutlassElement<T>::type;
  static constexpr int kAlign = 16 / sizeof(E);
  // A convolution's k-tile is a nested shape: 64 channels of one filter tap.
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
  using Epilogue = BiasResidualReluEpilogue<E, TileShape, cutlass::layout::TensorNHWC,
                                            cutlass::epilogue::TmaWarpSpecialized>;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, E,
      cutlass::layout::TensorNHWC, kAlign, E, cutlass::layout::TensorNHWC, kAlign, float,
      TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop,
                                                  Mainloop::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Op = cutlass::conv::device::ConvUniversalAdapter<Kernel>;

  static typename Op::Arguments arguments(const ConvParams& p) {
    // Activations NHWC and filters KRSC, both dense: CUTLASS derives their strides.
    Problem problem(cutlass::conv::Mode::kCrossCorrelation, {p.N, p.H, p.W, p.C},
                    {p.K, p.R, p.S, p.C}, {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w},
                    {p.stride_h, p.stride_w}, {p.dil_h, p.dil_w}, 1);
    typename Epilogue::StrideD out{};  // ((q, p, n), k): dense channels_last
    cute::get<0, 0>(out) = p.K;
    cute::get<0, 1>(out) = int64_t{p.Q} * p.K;
    cute::get<0, 2>(out) = int64_t{p.P} * p.Q * p.K;
    typename Epilogue::Arguments epilogue{};
    epilogue.ptr_C = static_cast<const E*>(p.res != nullptr ? p.res : p.y);  // unread at beta 0
    epilogue.dC = out;
    epilogue.ptr_D = static_cast<E*>(p.y);
    epilogue.dD = out;
    epilogue.thread.alpha = 1.0f;
    epilogue.thread.beta = p.res != nullptr ? 1.0f : 0.0f;
    epilogue.thread.bias_ptr = static_cast<const E*>(p.bias);
    typename Mainloop::Arguments mainloop{static_cast<const E*>(p.x), static_cast<const E*>(p.w)};
    return typename Op::Arguments(problem, mainloop, epilogue);
  }
};

}  // namespace
}  // namespace conv
}  // namespace resnet_fused

RESNET_FUSED_CUTLASS_ENTRY_POINTS(cutlass_conv_workspace_bytes, launch_cutlass_conv, ImplicitGemm)

#endif  // RESNET_FUSED_CUTLASS && RESNET_FUSED_SM90A
