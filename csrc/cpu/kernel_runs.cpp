#include "cpu/kernel_runs.h"

#include <Python.h>

#include <atomic>
#include <cstdint>

namespace resnet_fused {
namespace {

constexpr int kKernels = static_cast<int>(KernelRun::kCount);
// The op names as Python calls them, in KernelRun's order.
constexpr const char* kNames[kKernels] = {"winograd_conv3x3", "winograd_conv3d", "conv1x1",
                                          "conv1x1_add_relu_", "conv1x1_sum", "grouped_conv3x3",
                                          "stem_conv"};
std::atomic<int64_t> runs[kKernels];

PyObject* kernel_runs(PyObject*, PyObject*) {
  PyObject* counts = PyDict_New();
  if (counts == nullptr) return nullptr;
  for (int k = 0; k < kKernels; ++k) {
    PyObject* n = PyLong_FromLongLong(runs[k].load(std::memory_order_relaxed));
    if (n == nullptr || PyDict_SetItemString(counts, kNames[k], n) < 0) {
      Py_XDECREF(n);
      Py_DECREF(counts);
      return nullptr;
    }
    Py_DECREF(n);
  }
  return counts;
}

PyMethodDef methods[] = {
    {"kernel_runs", kernel_runs, METH_NOARGS,
     "kernel_runs(): {op name: calls its CPU kernel computed itself} since the library loaded "
     "(calls its conv_bias_act path took are not counted)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void count_kernel_run(KernelRun kernel) {
  runs[static_cast<int>(kernel)].fetch_add(1, std::memory_order_relaxed);
}

PyMethodDef* kernel_runs_methods() { return methods; }

}  // namespace resnet_fused
