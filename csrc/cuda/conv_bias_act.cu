// CUDA conv_bias_act / conv_bias_add_relu_ / pack_weight.
//
// act(conv2d(x, w) + bias [+ residual]) as one implicit-GEMM kernel over NHWC
// activations and KRSC weights; the epilogue adds bias and residual and applies
// ReLU in registers, so the output is written once and nothing else touches
// global memory. Kernels are in igemm.cuh. Paths:
//   fp16 / bf16          tensor cores, mma.sync m16n8k16, fp32 accumulation
//   fp32, TF32 allowed   tensor cores, mma.sync m16n8k8 TF32 (inputs rounded to nearest)
//   fp32, TF32 off       exact fp32 SIMT FMA kernel
//   < 16 out channels per group (ResNeXt 4-8 per group, depthwise): direct SIMT kernel
//   below sm_80          SIMT kernel for every dtype
// Launches go on the current stream, allocate only through PyTorch's caching
// allocator and never synchronize the host, so a model using them can be
// captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <climits>
#include <type_traits>

#include "checks.h"
#include "igemm.cuh"

namespace resnet_fused {
namespace {

using at::Tensor;
using c10::optional;
using conv::ConvParams;
using conv::FastDiv;

constexpr auto kCL = at::MemoryFormat::ChannelsLast;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

bool tf32_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  // Per-op query: the op-less form throws when the legacy and new TF32 flags disagree.
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

void check_cuda_conv(const char* op, const Tensor& input) {
  TORCH_CHECK(input.is_cuda(), op, " (CUDA kernel): expected input on a CUDA device, got ",
              input.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op,
              " (CUDA kernel): expected input dtype float16, bfloat16 or float32, got ", dt);
}

// ---------------------------------------------------------------------------
// Launchers.

template <typename T, typename Cfg, bool kVec>
void launch_tc(ConvParams p, cudaStream_t stream) {
  p.n_tiles = static_cast<int>(ceil_div(p.Kg, Cfg::BN));
  const int64_t blocks = ceil_div(p.M, Cfg::BM) * p.n_tiles;
  TORCH_CHECK(blocks <= INT_MAX, "conv_bias_act: too many output tiles (", blocks, ")");
  const int smem = Cfg::SMEM_BYTES + (kVec ? 0 : Cfg::BM * 16);  // + per-row im2col table
  auto kernel = conv::tc_conv_kernel<T, Cfg, kVec>;
  if (smem > 48 * 1024) {
    // Opting in to more than 48 KB of dynamic shared memory is per function and
    // device; done once (it is not a stream operation, so capture is unaffected).
    static std::atomic<uint64_t> configured{0};
    const int dev = c10::cuda::current_device();
    const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
    if (bit == 0 || !(configured.load() & bit)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      configured.fetch_or(bit);
    }
  }
  kernel<<<dim3(static_cast<unsigned>(blocks), p.groups), Cfg::THREADS, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_simt(ConvParams p, cudaStream_t stream) {
  p.n_tiles = static_cast<int>(ceil_div(p.Kg, 64));
  const int64_t blocks = ceil_div(p.M, 64) * p.n_tiles;
  TORCH_CHECK(blocks <= INT_MAX, "conv_bias_act: too many output tiles (", blocks, ")");
  conv::simt_conv_kernel<T><<<dim3(static_cast<unsigned>(blocks), p.groups), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_direct(ConvParams p, cudaStream_t stream) {
  const int k_blocks = static_cast<int>(ceil_div(p.Kg, conv::kDirectKPT));
  const int64_t total = static_cast<int64_t>(p.M) * p.groups * k_blocks;
  const int64_t blocks = ceil_div(total, 256);
  TORCH_CHECK(blocks <= INT_MAX, "conv_bias_act: output too large for the direct kernel (", total,
              " threads)");
  conv::direct_conv_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p, k_blocks, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Path and tile choice. Tile table (see igemm.cuh): 128x128 (L) when a group has
// more than 64 output channels and the grid still fills every SM once; else
// 128x64 (M) when that fills the SMs; else 64x64 (S), which keeps small GEMMs
// (batch 1, 7x7 maps) spread over more SMs. Not autotuned: one rule, no state.
template <typename T>
void dispatch(const ConvParams& p, const Tensor& x, const Tensor& w, cudaStream_t stream) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const bool tensor_cores = prop->major >= 8 && (!std::is_same<T, float>::value || tf32_allowed());
  if (p.Kgemm == 0 || p.Kg < 16) {
    launch_direct<T>(p, stream);
    return;
  }
  if (!tensor_cores) {
    launch_simt<T>(p, stream);
    return;
  }
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.C % VEC == 0 && p.Cg % VEC == 0 && aligned(x.const_data_ptr(), 16) &&
                   aligned(w.const_data_ptr(), 16);
  if (!vec) {
    launch_tc<T, conv::CfgX, false>(p, stream);
    return;
  }
  const int64_t sms = prop->multiProcessorCount;
  auto tiles = [&](int bm, int bn) { return ceil_div(p.M, bm) * ceil_div(p.Kg, bn) * p.groups; };
  if (p.Kg > 64 && tiles(128, 128) >= sms) {
    launch_tc<T, conv::CfgL, true>(p, stream);
  } else if (tiles(128, 64) >= sms) {
    launch_tc<T, conv::CfgM, true>(p, stream);
  } else {
    launch_tc<T, conv::CfgS, true>(p, stream);
  }
}

// out = act(conv(x, w) + bias [+ res]). x, out, res: dense channels_last; w: dense
// KRSC; bias: contiguous. res may be out itself (in place).
void conv_into(const Tensor& out, const Tensor& x, const Tensor& w, const optional<Tensor>& bias,
               const optional<Tensor>& res, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups, bool relu) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = w.size(0), Cg = w.size(1), R = w.size(2), S = w.size(3);
  const int64_t P = out.size(2), Q = out.size(3);
  const int64_t M = N * P * Q, Kgemm = R * S * Cg;
  // 32-bit coordinates in the kernels; element offsets are 64-bit.
  constexpr int64_t kMax = INT_MAX - 1024;
  TORCH_CHECK(M <= kMax && Kgemm <= kMax && C <= kMax && H <= kMax && W <= kMax && K <= kMax,
              "conv_bias_act (CUDA kernel): sizes too large for 32-bit coordinates: N*P*Q=", M,
              ", R*S*C/groups=", Kgemm, ", input ", x.sizes());
  TORCH_CHECK(groups <= 65535, "conv_bias_act (CUDA kernel): expected groups <= 65535, got ", groups);
  const int64_t pad_extent = std::max(padding[0], padding[1]) +
                             std::max(dilation[0] * (R - 1), dilation[1] * (S - 1)) +
                             std::max(stride[0] * P, stride[1] * Q);
  TORCH_CHECK(pad_extent <= kMax, "conv_bias_act (CUDA kernel): stride/padding/dilation too large");

  ConvParams p{};
  p.x = x.const_data_ptr();
  p.w = w.const_data_ptr();
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  p.res = res.has_value() ? res->const_data_ptr() : nullptr;
  p.y = out.data_ptr();
  p.N = static_cast<int>(N);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.C = static_cast<int>(C);
  p.P = static_cast<int>(P);
  p.Q = static_cast<int>(Q);
  p.K = static_cast<int>(K);
  p.R = static_cast<int>(R);
  p.S = static_cast<int>(S);
  p.Cg = static_cast<int>(Cg);
  p.Kg = static_cast<int>(K / groups);
  p.groups = static_cast<int>(groups);
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[1]);
  p.dil_h = static_cast<int>(dilation[0]);
  p.dil_w = static_cast<int>(dilation[1]);
  p.M = static_cast<int>(M);
  p.Kgemm = static_cast<int>(Kgemm);
  p.relu = relu;
  const size_t pair_bytes = 2 * out.element_size();
  p.pair_ok = K % 2 == 0 && p.Kg % 2 == 0 && aligned(p.y, pair_bytes) &&
              (p.res == nullptr || aligned(p.res, pair_bytes));
  p.div_pq = FastDiv(static_cast<uint32_t>(std::max<int64_t>(1, P * Q)));
  p.div_q = FastDiv(static_cast<uint32_t>(std::max<int64_t>(1, Q)));
  p.div_cg = FastDiv(static_cast<uint32_t>(std::max<int64_t>(1, Cg)));
  p.div_s = FastDiv(static_cast<uint32_t>(std::max<int64_t>(1, S)));

  auto stream = at::cuda::getCurrentCUDAStream().stream();
  switch (x.scalar_type()) {
    case at::kHalf:
      dispatch<__half>(p, x, w, stream);
      break;
    case at::kBFloat16:
      dispatch<__nv_bfloat16>(p, x, w, stream);
      break;
    case at::kFloat:
      dispatch<float>(p, x, w, stream);
      break;
    default:
      TORCH_CHECK(false, "conv_bias_act (CUDA kernel): unsupported dtype ", x.scalar_type());
  }
}

// ---------------------------------------------------------------------------
// Ops.

Tensor conv_bias_act_cuda(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                          const optional<Tensor>& residual, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          bool relu, bool assume_finite) {
  (void)assume_finite;  // the epilogue's ReLU propagates NaN exactly at no cost
  check_conv_bias_act_args(input, weight, bias, residual, stride, padding, dilation, groups);
  check_cuda_conv("conv_bias_act", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = output_memory_format(input);
  const auto out_size = conv_output_size(input, weight, stride, padding, dilation);
  if (c10::multiply_integers(out_size) == 0) {
    return at::empty(out_size, input.options().memory_format(fmt));
  }
  // Layout conversions are no-ops for the expected inputs (channels_last
  // activations, weights from pack_weight).
  const Tensor x = input.contiguous(kCL);
  const Tensor w = weight.contiguous(kCL);
  const optional<Tensor> b = bias.has_value() ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  const optional<Tensor> r =
      residual.has_value() ? optional<Tensor>(residual->contiguous(kCL)) : c10::nullopt;
  Tensor out = at::empty(out_size, input.options().memory_format(kCL));
  conv_into(out, x, w, b, r, stride, padding, dilation, groups, relu);
  return fmt == kCL ? out : out.contiguous(fmt);
}

void conv_bias_add_relu_cuda_(Tensor& residual, const Tensor& input, const Tensor& weight,
                              const optional<Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              bool assume_finite) {
  (void)assume_finite;
  check_conv_bias_act_args(input, weight, bias, residual, stride, padding, dilation, groups);
  check_cuda_conv("conv_bias_add_relu_", input);
  const c10::cuda::CUDAGuard guard(input.device());
  if (residual.numel() == 0) return;
  const Tensor x = input.contiguous(kCL);
  const Tensor w = weight.contiguous(kCL);
  const optional<Tensor> b = bias.has_value() ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  // In place only when no CTA can overwrite what another still reads.
  const bool in_place = residual.is_contiguous(kCL) && !residual.is_alias_of(x) &&
                        !residual.is_alias_of(w) && !(b.has_value() && residual.is_alias_of(*b));
  if (in_place) {
    conv_into(residual, x, w, b, residual, stride, padding, dilation, groups, /*relu=*/true);
    return;
  }
  Tensor out = at::empty(residual.sizes(), input.options().memory_format(kCL));
  conv_into(out, x, w, b, residual.contiguous(kCL), stride, padding, dilation, groups, /*relu=*/true);
  residual.copy_(out);
}

// KRSC (the channels_last layout of the (K, C/groups, R, S) weight) is what the
// kernels read; the logical shape is unchanged, so an unpacked weight works too.
Tensor pack_weight_cuda(const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, at::IntArrayRef input_size) {
  TORCH_CHECK(weight.dim() == 4, "pack_weight: expected a 4-D weight, got shape ", weight.sizes());
  TORCH_CHECK(input_size.size() == 4, "pack_weight: expected a 4-D input_size, got ", input_size);
  TORCH_CHECK(groups > 0 && weight.size(0) % groups == 0, "pack_weight: expected weight.size(0) (",
              weight.size(0), ") divisible by groups=", groups);
  (void)stride;
  (void)padding;
  (void)dilation;
  return weight.contiguous(kCL);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bias_act", &conv_bias_act_cuda);
  m.impl("conv_bias_add_relu_", &conv_bias_add_relu_cuda_);
  m.impl("pack_weight", &pack_weight_cuda);
}

}  // namespace resnet_fused
