// conv_bias_act's 1x1 stride-1 convolutions as one GEMM on CUTLASS's Hopper mainloop:
// TMA loads, warp-specialized wgmma (producer and two consumer warpgroups), persistent
// CTAs, 128x128x64 tiles; CUTLASS's epilogue fusion computes relu(acc + res + bias)
// and stores through shared memory with TMA. In channels_last the input is the GEMM's
// A ([N*H*W, C], C contiguous) and the weight ([K, C]) its B, K-major: no im2col.
//
// Forced only (RESNET_FUSED_CUDA_TILE=CUTLASS, conv_bias_act.cpp) until measured on a
// GPU. Built where the archs include 9.0a and CUTLASS's headers were found (setup.py
// defines RESNET_FUSED_CUTLASS); elsewhere this file is empty and the host never calls it.
//
// fp16 and bf16 with the ReLU only: the convolutions it serves in a ResNet (a
// bottleneck's conv1, and conv3 with the residual) all end in one.

#include "launch.h"

#if defined(RESNET_FUSED_CUTLASS) && defined(RESNET_FUSED_SM90A)

#include "cutlass_common.cuh"  // first: it defines NDEBUG before CUTLASS's headers

#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

namespace resnet_fused {
namespace conv {
namespace {

template <typename T>
struct Gemm1x1 {
  using E = typename CutlassElement<T>::type;
  static constexpr int kAlign = 16 / sizeof(E);  // TMA: 16-byte rows and bases
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using Epilogue = BiasResidualReluEpilogue<E, TileShape, cutlass::layout::RowMajor,
                                            cutlass::epilogue::TmaWarpSpecializedCooperative>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, cutlass::layout::RowMajor, kAlign,
      E, cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Op::Arguments arguments(const ConvParams& p) {
    const int m = p.M, n = p.K, k = p.C;
    using cute::make_shape;
    typename Op::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const E*>(p.x),
         cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(m, k, 1)),
         static_cast<const E*>(p.w),
         cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(n, k, 1))},
        {{},
         static_cast<const E*>(p.res != nullptr ? p.res : p.y),
         cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(m, n, 1)),
         static_cast<E*>(p.y),
         cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(m, n, 1))}};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = p.res != nullptr ? 1.0f : 0.0f;
    args.epilogue.thread.bias_ptr = static_cast<const E*>(p.bias);
    return args;
  }
};

}  // namespace
}  // namespace conv
}  // namespace resnet_fused

RESNET_FUSED_CUTLASS_ENTRY_POINTS(cutlass_workspace_bytes, launch_cutlass, Gemm1x1)

#endif  // RESNET_FUSED_CUTLASS && RESNET_FUSED_SM90A
