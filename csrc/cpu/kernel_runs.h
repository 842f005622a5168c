// How many calls each CPU kernel computed itself, rather than handing them to
// conv_bias_act (its path for the shapes, dtypes, values or CPUs it does not take).
// The fallbacks give the same results, so only these counts tell a test that the
// kernel it means to check did run.
#pragma once

struct PyMethodDef;

namespace resnet_fused {

enum class KernelRun {
  kWinograd,
  kWinograd3d,
  kConv1x1,
  kConv1x1AddRelu,
  kConv1x1Sum,
  kGroupedConv,
  kStemConv,
  kCount
};

// One relaxed atomic increment per op call.
void count_kernel_run(KernelRun kernel);

// _C.kernel_runs(): {op name: calls its kernel computed} since the library loaded.
PyMethodDef* kernel_runs_methods();

}  // namespace resnet_fused
