// FusedResNet's forward for the input it last recorded, as one C call: the checks that a
// replay of its op plan is what the forward would compute, the input made channels_last and
// scanned for NaN/Inf, and the replay. Each of those steps from Python, with its code out of
// cache as it is after the forward before it, cost 0.03-0.15 ms; ResNet-50's forward spent
// ~0.4 ms on them at batch 1 (AMD EPYC Zen 4). Anything it does not handle it leaves to the
// Python forward, by returning None.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <vector>

#include "cpu/finite.h"
#include "fast_forward.h"
#include "op_plan.h"
#include "state_watch.h"

namespace resnet_fused {
namespace {

// The state tuple that resnet_fused/model.py makes when it records a plan:
enum Field {
  kWatch,          // the fold's StateWatch (keeps what its capsule reads alive)
  kWatchCapsule,   // its _C.state_watch capsule
  kAssignments,    // state_watch.assignments, the process's assignment counter
  kProfiler,       // the torch.autograd.profiler module (its _is_profiler_enabled)
  kGlobalHooks,    // (torch.nn.modules.module._global_forward_hooks, _pre_hooks)
  kPlan,           // the plan's _C.plan_handle
  kSizes,          // the input's sizes the plan was recorded for (a tuple of ints)
  kDtype,          // its dtype
  kThreads,        // torch.get_num_threads() then
  kOutput,         // the index of the plan's output to return
  kFields
};

bool same_sizes(const at::Tensor& t, PyObject* sizes) {
  if (PyTuple_GET_SIZE(sizes) != t.dim()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (PyLong_AsLongLong(PyTuple_GET_ITEM(sizes, d)) != t.size(d)) return false;
  }
  return true;
}

// 1 if the Python-side state allows the replay, 0 if not, -1 with a Python error set.
int python_state_allows(PyObject* state, const at::Tensor& x) {
  static PyObject* const kAssignmentsName = PyUnicode_InternFromString("assignments");
  static PyObject* const kProfilerFlag = PyUnicode_InternFromString("_is_profiler_enabled");
  PyObject* watched = PyObject_GetAttr(PyTuple_GET_ITEM(state, kWatch), kAssignmentsName);
  if (watched == nullptr) return -1;
  const int same = PyObject_RichCompareBool(
      watched, PyList_GET_ITEM(PyTuple_GET_ITEM(state, kAssignments), 0), Py_EQ);
  Py_DECREF(watched);
  if (same != 1) return same;
  PyObject* profiling = PyObject_GetAttr(PyTuple_GET_ITEM(state, kProfiler), kProfilerFlag);
  if (profiling == nullptr) return -1;
  const int on = PyObject_IsTrue(profiling);
  Py_DECREF(profiling);
  if (on != 0) return on < 0 ? -1 : 0;
  // A global forward hook wants to see the modules the plan does not call.
  PyObject* global_hooks = PyTuple_GET_ITEM(state, kGlobalHooks);
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(global_hooks); ++i) {
    const Py_ssize_t n = PyObject_Length(PyTuple_GET_ITEM(global_hooks, i));
    if (n != 0) return n < 0 ? -1 : 0;
  }
  const auto* dtype = reinterpret_cast<THPDtype*>(PyTuple_GET_ITEM(state, kDtype));
  if (x.scalar_type() != dtype->scalar_type || !same_sizes(x, PyTuple_GET_ITEM(state, kSizes))) {
    return 0;
  }
  if (PyLong_AsLongLong(PyTuple_GET_ITEM(state, kThreads)) != at::get_num_threads()) return 0;
  return PyErr_Occurred() ? -1 : 1;
}

// fast_forward(state, x): the plan's output for x, or None where the Python forward must run.
PyObject* fast_forward(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *state, *input;
  if (!PyArg_ParseTuple(args, "O!O:fast_forward", &PyTuple_Type, &state, &input)) return nullptr;
  if (PyTuple_GET_SIZE(state) != kFields) {
    PyErr_Format(PyExc_ValueError, "fast_forward: expected a state of %d fields, got %zd",
                 static_cast<int>(kFields), PyTuple_GET_SIZE(state));
    return nullptr;
  }
  // A plain CPU tensor, in no autograd graph, traced by nothing, under no autocast: what
  // the recorded forward took. (torch.compile never gets here: model.py checks first.)
  if (!THPVariable_CheckExact(input)) Py_RETURN_NONE;
  const at::Tensor& x = THPVariable_Unpack(input);
  // Nor a torch.func transform (its layers put this key in the thread's dispatch state)
  // or a forward-mode AD tangent, for which the ops have no rules.
  if (!x.device().is_cpu() || x.layout() != at::kStrided || c10::GradMode::is_enabled() ||
      torch::jit::tracer::isTracing() || at::autocast::is_autocast_enabled(at::kCPU) ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      x._fw_grad(/*level=*/0).defined()) {
    Py_RETURN_NONE;
  }
  const int allowed = python_state_allows(state, x);
  if (allowed <= 0) {
    if (allowed < 0) return nullptr;
    Py_RETURN_NONE;
  }
  const int changed = state_watch_changed(PyTuple_GET_ITEM(state, kWatchCapsule));
  if (changed != 0) {
    if (changed < 0) return nullptr;
    Py_RETURN_NONE;
  }
  OpPlan* plan = plan_from_handle(PyTuple_GET_ITEM(state, kPlan));
  if (plan == nullptr) return nullptr;
  const int64_t output = PyLong_AsLongLong(PyTuple_GET_ITEM(state, kOutput));
  if (output == -1 && PyErr_Occurred()) return nullptr;
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    // The plan was recorded for a finite input (its ops skip their scans).
    if (all_finite(xc)) {
      // As dispatch.without_autograd(): the ops' Python autograd layer skipped.
      at::AutoDispatchBelowADInplaceOrView no_autograd;
      out = run_plan(*plan, xc).at(output);
    }
  }
  if (!out.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"fast_forward", fast_forward, METH_VARARGS,
     "fast_forward(state, x): the recorded forward's output for x, or None where the Python "
     "forward must run (resnet_fused/model.py makes the state)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* fast_forward_methods() { return methods; }

}  // namespace resnet_fused
