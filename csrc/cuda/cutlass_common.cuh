// What the CUTLASS translation units share (cutlass_gemm1x1_sm90.cu,
// cutlass_conv_sm90.cu): CUTLASS's element types for ours, and one launch of a CUTLASS
// device operator. Included only where RESNET_FUSED_CUTLASS and RESNET_FUSED_SM90A are
// defined.
#pragma once

// CUTLASS's device-side asserts are calls; a call between wgmma instructions makes
// ptxas serialize them (warning C7510). Release builds have none.
#ifndef NDEBUG
#define NDEBUG
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/numeric_types.h>

namespace resnet_fused {
namespace conv {

template <typename T>
struct CutlassElement;
template <>
struct CutlassElement<__half> {
  using type = cutlass::half_t;
};
template <>
struct CutlassElement<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

// Our epilogue on CUTLASS's: D = relu(acc + beta * C + bias[output channel]), computed
// in fp32, C the residual (beta 1) or unread (beta 0); NaN propagates through the ReLU.
// Stored through shared memory with TMA, 16-byte aligned rows. One CTA per SM cluster.
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
template <typename E, class TileShape, class Layout, class Schedule>
using BiasResidualReluEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, E, Layout, 16 / sizeof(E), E,
    Layout, 16 / sizeof(E), Schedule,
    cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::ReLu, E, float,
                                                       E, E, float>>::CollectiveOp;

// Checks, initializes (TMA descriptors, on the host) and launches `Op` on `stream`.
// Returns null, or CUTLASS's reason.
template <class Op>
const char* run_cutlass_op(const typename Op::Arguments& args, void* workspace,
                           cudaStream_t stream) {
  Op op;
  cutlass::Status s = op.can_implement(args);
  if (s != cutlass::Status::kSuccess) return cutlassGetStatusString(s);
  s = op.initialize(args, workspace, stream);
  if (s != cutlass::Status::kSuccess) return cutlassGetStatusString(s);
  s = op.run(stream);
  return s == cutlass::Status::kSuccess ? nullptr : cutlassGetStatusString(s);
}

}  // namespace conv
}  // namespace resnet_fused

// The two entry points launch.h declares for one kernel family, and their fp16 and bf16
// instantiations: `bytes` (the workspace) and `launch` for Impl<T>, a struct with the
// CUTLASS device operator `Op` and `static Op::Arguments arguments(const ConvParams&)`.
#define RESNET_FUSED_CUTLASS_ENTRY_POINTS(bytes, launch, Impl)                              \
  namespace resnet_fused {                                                                 \
  namespace conv {                                                                         \
  template <typename T>                                                                    \
  size_t bytes(const ConvParams& p) {                                                      \
    return Impl<T>::Op::get_workspace_size(Impl<T>::arguments(p));                         \
  }                                                                                        \
  template <typename T>                                                                    \
  const char* launch(const ConvParams& p, void* workspace, cudaStream_t stream) {          \
    return run_cutlass_op<typename Impl<T>::Op>(Impl<T>::arguments(p), workspace, stream); \
  }                                                                                        \
  template size_t bytes<__half>(const ConvParams&);                                        \
  template size_t bytes<__nv_bfloat16>(const ConvParams&);                                 \
  template const char* launch<__half>(const ConvParams&, void*, cudaStream_t);             \
  template const char* launch<__nv_bfloat16>(const ConvParams&, void*, cudaStream_t);      \
  }                                                                                        \
  }
