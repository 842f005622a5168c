// CUDA conv_bias_act / conv_bias_add_relu_ / pack_weight: argument checks, the
// choice of kernel and the launch. Host code only (ATen, host compiler); the
// kernels are in igemm.cuh, compiled per dtype in conv_kernels_*.cu.
//
// act(conv2d(x, w) + bias [+ residual]) as one implicit-GEMM kernel over NHWC
// activations and KRSC weights; the epilogue adds bias and residual and applies
// ReLU in registers, so the output is written once and nothing else touches
// global memory. Paths:
//   fp16 / bf16          tensor cores, mma.sync m16n8k16, fp32 accumulation (Hopper
//                        wgmma m64n128k16 when RESNET_FUSED_CUDA_TILE=H, sm_90a builds)
//   fp32, TF32 allowed   tensor cores, mma.sync m16n8k8 TF32 (inputs rounded to nearest)
//   fp32, TF32 off       exact fp32 SIMT FMA kernel
//   < 16 out channels per group (ResNeXt 4-8 per group, depthwise): direct SIMT kernel
//   no sm_80+ code for this GPU: SIMT kernel for every dtype
// Launches go on the current stream, allocate only through PyTorch's caching
// allocator and never synchronize the host, so a model using them can be
// captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <climits>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "checks.h"
#include "launch.h"

namespace resnet_fused {
namespace {

using at::Tensor;
using c10::optional;
using conv::ConvKernel;
using conv::ConvParams;
using conv::FastDiv;

constexpr auto kCL = at::MemoryFormat::ChannelsLast;

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
// Which kernel runs.

// RESNET_FUSED_CUDA_TILE forces one kernel config wherever it can run, so that
// the reference tests can check each config on every shape (scripts/gpu_check.sh
// runs them once per value):
//   L, M, S  that tensor-core tile for every launch with vector loads (launches
//            whose operands need scalar loads keep X, the only config for them)
//   X        the scalar-load tensor-core kernel for every tensor-core launch
//   L2       L with the MMAs issued before the next k-tile's loads, where L could run
//   H        the Hopper wgmma kernel for every fp16/bf16 launch with vector loads
//            (an error where it cannot run: not an sm_90 GPU, or no 9.0a in the
//            build's archs); fp32 and scalar-load launches keep the size rule / X.
//            Not chosen otherwise until it has been checked on a GPU.
//   CUTLASS  CUTLASS's Hopper kernels for every fp16/bf16 conv they compute (one group,
//            bias, ReLU, 16-byte aligned, K a multiple of 8): the GEMM for 1x1 stride-1
//            convs (cutlass_gemm1x1_sm90.cu; C a multiple of 8), the implicit-GEMM conv
//            for the others (cutlass_conv_sm90.cu; C a multiple of 64); an error where
//            they cannot run (not an sm_90 GPU, or not in the build); the size rule for
//            the other convs. Not chosen otherwise until checked on a GPU.
//   SIMT     the SIMT kernel for every GEMM launch, tensor cores or not
//   auto     (or unset) the size rule in choose_kernel
// The direct kernel's cases are never overridden. Read at every dispatch (a
// getenv, well under a microsecond), so that one process can time configs side by
// side (benchmarks/conv_shapes.py --tiles); change it only from the thread that
// launches (setenv may move the environment under a concurrent getenv). A CUDA
// graph keeps the kernels chosen when it was captured.
constexpr const char* kTileEnv = "RESNET_FUSED_CUDA_TILE";

std::optional<ConvKernel> tile_override() {
  static const std::pair<const char*, ConvKernel> kNames[] = {
      {"L", ConvKernel::kTcL}, {"M", ConvKernel::kTcM},    {"S", ConvKernel::kTcS},
      {"X", ConvKernel::kTcX}, {"H", ConvKernel::kTcH}, {"L2", ConvKernel::kTcL2},
      {"CUTLASS", ConvKernel::kCutlass}, {"SIMT", ConvKernel::kSimt}};
  const char* env = std::getenv(kTileEnv);
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto") return std::nullopt;
  for (const auto& [name, kernel] : kNames) {
    if (v == name) return kernel;
  }
  TORCH_CHECK(false, kTileEnv,
              ": expected one of auto, L, M, S, X, H, L2, CUTLASS, SIMT (or unset), got '",
              v, "'");
  return std::nullopt;
}


// Whether the current device runs the tensor-core kernels for T as compiled for
// sm_80+. The device's compute capability is not enough: from a build whose only
// code for this GPU is PTX older than sm_80, the driver compiles the kernel's
// __trap() stub. Queried once per device.
template <typename T>
bool tensor_core_code(int device) {
  static PerDeviceFlag known, usable;
  if (known.test(device)) return usable.test(device);
  int ptx = 0;
  C10_CUDA_CHECK(conv::tc_ptx_version<T>(&ptx));
  if (ptx >= 80) usable.set(device);
  known.set(device);
  return ptx >= 80;
}

// The wgmma kernel's code exists only in a build for 9.0a (setup.py defines
// RESNET_FUSED_SM90A then, and not when the build also has plain 9.0 code, which
// an sm_90 GPU could load instead: there the kernel is a trap stub), and runs only
// on sm_90 GPUs.
void check_wgmma_runs(int device) {
  const auto* prop = at::cuda::getDeviceProperties(device);
#ifdef RESNET_FUSED_SM90A
  constexpr bool built = true;
#else
  constexpr bool built = false;
#endif
  TORCH_CHECK(built && prop->major == 9 && prop->minor == 0, kTileEnv,
              "=H: the wgmma kernel needs an sm_90 GPU (H100, H200) and a build for 9.0a; this "
              "GPU is sm_", prop->major, prop->minor, " and this build's archs are '",
              RESNET_FUSED_CUDA_ARCHS, "' (build with TORCH_CUDA_ARCH_LIST=9.0a, without plain "
              "9.0)");
}

// CUTLASS's kernels: in a build with them (CUTLASS's headers found, 9.0a among the
// archs), on an sm_90 GPU.
void check_cutlass_runs(int device) {
  const auto* prop = at::cuda::getDeviceProperties(device);
  TORCH_CHECK(conv::kCutlassBuilt && prop->major == 9 && prop->minor == 0, kTileEnv,
              "=CUTLASS: the CUTLASS kernels need an sm_90 GPU (H100, H200) and a build with "
              "CUTLASS's headers (pip install nvidia-cutlass) for 9.0a; this GPU is sm_",
              prop->major, prop->minor, ", this build's archs are '", RESNET_FUSED_CUDA_ARCHS,
              "' and it ", conv::kCutlassBuilt ? "has" : "does not have", " them");
}

// Which CUTLASS kernel computes this conv, if one does. Both: one group, a bias and
// the ReLU, K a multiple of 8, every operand 16-byte aligned (TMA). The GEMM: 1x1,
// stride 1, no padding, C a multiple of 8. The implicit-GEMM conv: C a multiple of its
// 64-channel k-tile.
enum class CutlassPath { kNone, kGemm, kConv };
CutlassPath cutlass_path(const ConvParams& p) {
  if (p.groups != 1 || !p.relu || p.bias == nullptr || p.K % 8 != 0 || !aligned(p.x, 16) ||
      !aligned(p.w, 16) || !aligned(p.bias, 16) || !aligned(p.y, 16) ||
      (p.res != nullptr && !aligned(p.res, 16))) {
    return CutlassPath::kNone;
  }
  if (p.R == 1 && p.S == 1 && p.stride_h == 1 && p.stride_w == 1 && p.pad_h == 0 &&
      p.pad_w == 0 && p.C % 8 == 0) {
    return CutlassPath::kGemm;
  }
  return p.C % 64 == 0 ? CutlassPath::kConv : CutlassPath::kNone;
}

// Path and tile choice. Tile table (see igemm.cuh): 128x128 (L) when a group has
// more than 64 output channels and the grid still fills every SM once; else
// 128x64 (M) when that fills the SMs; else 64x64 (S), which keeps small GEMMs
// (batch 1, 7x7 maps) spread over more SMs. Not autotuned: one rule, no state.
template <typename T>
ConvKernel choose_kernel(const ConvParams& p, const Tensor& x, const Tensor& w, int device) {
  // Direct: a GEMM tile would be mostly empty (< 16 output channels per group),
  // or there are more groups than the GEMM kernels' grid has rows (y <= 65535).
  if (p.Kgemm == 0 || p.Kg < 16 || p.groups > conv::kMaxGridY) return ConvKernel::kDirect;
  const auto forced = tile_override();
  // Forced H where the wgmma kernel cannot run is an error, not a silent other kernel.
  if (forced == ConvKernel::kTcH && sizeof(T) == 2) check_wgmma_runs(device);
  const bool tensor_cores =
      tensor_core_code<T>(device) && (!std::is_same<T, float>::value || tf32_allowed());
  if (!tensor_cores || forced == ConvKernel::kSimt) return ConvKernel::kSimt;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.C % VEC == 0 && p.Cg % VEC == 0 && aligned(x.const_data_ptr(), 16) &&
                   aligned(w.const_data_ptr(), 16);
  if (!vec || forced == ConvKernel::kTcX) return ConvKernel::kTcX;
  if (forced == ConvKernel::kTcH) {
    if (sizeof(T) == 2) return ConvKernel::kTcH;  // fp32 (TF32): the size rule
  } else if (forced == ConvKernel::kCutlass) {
    if (sizeof(T) == 2 && cutlass_path(p) != CutlassPath::kNone) {
      check_cutlass_runs(device);
      return ConvKernel::kCutlass;
    }
  } else if (forced.has_value()) {
    return *forced;
  }
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto tiles = [&](ConvKernel k) { return conv::grid_x(k, p) * p.groups; };
  if (p.Kg > 64 && tiles(ConvKernel::kTcL) >= sms) return ConvKernel::kTcL;
  if (tiles(ConvKernel::kTcM) >= sms) return ConvKernel::kTcM;
  return ConvKernel::kTcS;
}

template <typename T>
void launch(const ConvParams& p, const Tensor& x, const Tensor& w) {
  const int device = c10::cuda::current_device();
  const ConvKernel k = choose_kernel<T>(p, x, w, device);
  if constexpr (sizeof(T) == 2 && conv::kCutlassBuilt) {
    if (k == ConvKernel::kCutlass) {
      const bool gemm = cutlass_path(p) == CutlassPath::kGemm;
      const size_t bytes = gemm ? conv::cutlass_workspace_bytes<T>(p)
                                : conv::cutlass_conv_workspace_bytes<T>(p);
      // From the caching allocator, on this stream: freed when the tensor is, after
      // the kernel in stream order.
      const Tensor workspace =
          at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
      void* ws = bytes ? workspace.data_ptr() : nullptr;
      const auto stream = at::cuda::getCurrentCUDAStream().stream();
      const char* err = gemm ? conv::launch_cutlass<T>(p, ws, stream)
                             : conv::launch_cutlass_conv<T>(p, ws, stream);
      TORCH_CHECK(err == nullptr, "conv_bias_act (CUTLASS ", gemm ? "GEMM" : "implicit-GEMM conv",
                  "): ", err, " (input ", p.N, "x", p.C, "x", p.H, "x", p.W, ", weight ", p.K,
                  "x", p.C, "x", p.R, "x", p.S, ")");
      C10_CUDA_CHECK(cudaGetLastError());
      return;
    }
  }
  const int64_t blocks = conv::grid_x(k, p);
  TORCH_CHECK(blocks <= INT_MAX, "conv_bias_act (CUDA kernel): output too large for one grid (",
              blocks, " blocks for N*P*Q=", p.M, ", K=", p.K, ", groups=", p.groups, ")");
  TORCH_INTERNAL_ASSERT(k == ConvKernel::kDirect || p.groups <= conv::kMaxGridY);
  C10_CUDA_CHECK(conv::launch_conv<T>(k, p, device, at::cuda::getCurrentCUDAStream().stream()));
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

  switch (x.scalar_type()) {
    case at::kHalf:
      launch<__half>(p, x, w);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(p, x, w);
      break;
    case at::kFloat:
      launch<float>(p, x, w);
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
  if (input.numel() == 0) {
    // No input channels, or an image that is all padding: an empty sum.
    Tensor out = at::zeros(out_size, input.options().memory_format(fmt));
    if (bias.has_value()) out.add_(bias->reshape({1, -1, 1, 1}));
    if (residual.has_value()) out.add_(*residual);
    return relu ? out.relu_() : out;
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
  check_conv_bias_act_args(input, weight, bias, residual, stride, padding, dilation, groups,
                           "conv_bias_add_relu_");
  check_cuda_conv("conv_bias_add_relu_", input);
  const c10::cuda::CUDAGuard guard(input.device());
  if (residual.numel() == 0) return;
  if (input.numel() == 0) {
    residual.copy_(conv_bias_act_cuda(input, weight, bias, residual, stride, padding, dilation,
                                      groups, /*relu=*/true, assume_finite));
    return;
  }
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
  check_pack_weight_args(weight, groups, input_size);
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
