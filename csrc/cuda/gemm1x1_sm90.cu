// conv_bias_act's 1x1 stride-1 convolutions as one GEMM on CUTLASS's Hopper mainloop:
// TMA loads, warp-specialized wgmma (producer and two consumer warpgroups), persistent
// CTAs, 128x128x64 tiles; CUTLASS's epilogue fusion computes relu(acc + res + bias)
// and stores through shared memory with TMA. In channels_last the input is the GEMM's
// A ([N*H*W, C], C contiguous) and the weight ([K, C]) its B, K-major: no im2col.
//
// Forced only (RESNET_FUSED_CUDA_TILE=CUTLASS, conv_bias_act.cpp) until measured on a
// GPU. Built where the archs include 9.0a and CUTLASS's headers were found (setup.py
// defines RESNET_FUSED_CUTLASS); elsewhere the functions below say it is not built.
//
// fp16 and bf16 with the ReLU only: the convolutions it serves in a ResNet (a
// bottleneck's conv1, and conv3 with the residual) all end in one.

// CUTLASS's device-side asserts are calls; a call between wgmma instructions makes
// ptxas serialize them (warning C7510). Release builds have none.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "launch.h"

#if defined(RESNET_FUSED_CUTLASS) && defined(RESNET_FUSED_SM90A)

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/util/packed_stride.hpp>

namespace resnet_fused {
namespace conv {
namespace {

template <typename T>
struct CutlassType;
template <>
struct CutlassType<__half> {
  using type = cutlass::half_t;
};
template <>
struct CutlassType<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

template <typename T>
struct Gemm1x1 {
  using E = typename CutlassType<T>::type;
  static constexpr int kAlign = 16 / sizeof(E);  // TMA: 16-byte rows and bases
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  // D = relu(1 * acc + beta * C + bias[column]); C is the residual (beta 1) or unread
  // (beta 0). NaN propagates through the ReLU.
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<
      cutlass::epilogue::thread::ReLu, E, float, E, E, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, E,
      cutlass::layout::RowMajor, kAlign, E, cutlass::layout::RowMajor, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, cutlass::layout::RowMajor, kAlign,
      E, cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const ConvParams& p) {
    const int m = p.M, n = p.K, k = p.C;
    using cute::make_shape;
    typename Gemm::Arguments args{
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

bool cutlass_built() { return true; }

template <typename T>
size_t cutlass_workspace_bytes(const ConvParams& p) {
  using G = Gemm1x1<T>;
  return G::Gemm::get_workspace_size(G::arguments(p));
}

template <typename T>
const char* launch_cutlass(const ConvParams& p, void* workspace, cudaStream_t stream) {
  using G = Gemm1x1<T>;
  const auto args = G::arguments(p);
  typename G::Gemm gemm;
  cutlass::Status s = gemm.can_implement(args);
  if (s != cutlass::Status::kSuccess) return cutlassGetStatusString(s);
  s = gemm.initialize(args, workspace, stream);
  if (s != cutlass::Status::kSuccess) return cutlassGetStatusString(s);
  s = gemm.run(stream);
  return s == cutlass::Status::kSuccess ? nullptr : cutlassGetStatusString(s);
}

}  // namespace conv
}  // namespace resnet_fused

#else

namespace resnet_fused {
namespace conv {

bool cutlass_built() { return false; }

template <typename T>
size_t cutlass_workspace_bytes(const ConvParams&) {
  return 0;
}

template <typename T>
const char* launch_cutlass(const ConvParams&, void*, cudaStream_t) {
  return "not built";
}

}  // namespace conv
}  // namespace resnet_fused

#endif

namespace resnet_fused {
namespace conv {

template size_t cutlass_workspace_bytes<__half>(const ConvParams&);
template size_t cutlass_workspace_bytes<__nv_bfloat16>(const ConvParams&);
template const char* launch_cutlass<__half>(const ConvParams&, void*, cudaStream_t);
template const char* launch_cutlass<__nv_bfloat16>(const ConvParams&, void*, cudaStream_t);

}  // namespace conv
}  // namespace resnet_fused
