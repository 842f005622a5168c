// OpPlan: a recorded sequence of op calls, replayed from C++ (resnet_fused/op_plan.py
// records it). Each step is one dispatcher call whose arguments are constants (folded
// weights, flags) or tensors that the plan's input or earlier steps produced ("slots").
// Replaying it skips what each call costs in Python: the model walk, the argument
// parsing of torch.ops and the Python objects of every result.
//
// The arguments come in typed lists because a TorchScript class method takes no list of
// mixed values: for each argument of the op's schema, in order, its value is the next
// entry of the list of its type (int[] arguments: their length, then their values; other
// optional arguments than tensors an int: -1 for None, else a dtype's c10::ScalarType).
#include <Python.h>
#include <pybind11/pybind11.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/api/object.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "op_plan.h"

namespace resnet_fused {
namespace {

using at::Tensor;

struct Step {
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;         // the constants; slot arguments left None
  std::vector<std::pair<size_t, int64_t>> slot_args;  // (argument index, slot)
  int64_t out_slot;                      // slot of the returned tensor, or -1
  std::vector<int64_t> release;          // slots no later step reads
};

}  // namespace

class OpPlan : public torch::CustomClassHolder {
 public:
  explicit OpPlan(int64_t inputs) : inputs_(inputs), slots_(inputs) {}

  // Appends a call of `name`.`overload`; tensor_slots[i] >= 0 makes the i-th tensor
  // argument that slot (tensors[i] is then ignored). Returns the slot of its result
  // (-1 when it returns none).
  int64_t add_step(const std::string& name, const std::string& overload,
                   const std::vector<c10::optional<Tensor>>& tensors,
                   const std::vector<int64_t>& tensor_slots, const std::vector<int64_t>& ints,
                   const c10::List<bool>& bools, const std::vector<double>& floats) {
    TORCH_CHECK(tensors.size() == tensor_slots.size(),
                "OpPlan.add_step: expected as many tensor_slots as tensors, got ",
                tensor_slots.size(), " and ", tensors.size());
    auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const auto& schema = handle.schema();
    Step step{handle, {}, {}, -1, {}};
    size_t t = 0, i = 0, b = 0, f = 0;
    auto take = [&](size_t& at, size_t size, const char* what) {
      TORCH_CHECK(at < size, "OpPlan.add_step: ", name, " needs more ", what, " arguments");
      return at++;
    };
    for (const auto& arg : schema.arguments()) {
      const auto& type = arg.type();  // SymInt as int: plans are for concrete shapes
      const auto kind = type->kind();
      if (kind == c10::TypeKind::TensorType ||
          (kind == c10::TypeKind::OptionalType &&
           type->castRaw<c10::OptionalType>()->getElementType()->kind() ==
               c10::TypeKind::TensorType)) {
        const size_t at = take(t, tensors.size(), "tensor");
        if (tensor_slots[at] >= 0) {
          TORCH_CHECK(tensor_slots[at] < slots_, "OpPlan.add_step: slot ", tensor_slots[at],
                      " is not produced before this step");
          step.slot_args.emplace_back(step.args.size(), tensor_slots[at]);
          reads_.push_back({tensor_slots[at], static_cast<int64_t>(steps_.size())});
          step.args.emplace_back();
        } else {
          step.args.emplace_back(tensors[at]);
        }
      } else if (kind == c10::TypeKind::IntType) {
        step.args.emplace_back(ints[take(i, ints.size(), "int")]);
      } else if (kind == c10::TypeKind::ListType &&
                 type->castRaw<c10::ListType>()->getElementType()->kind() ==
                     c10::TypeKind::IntType) {
        const int64_t n = ints[take(i, ints.size(), "int")];
        std::vector<int64_t> values;
        for (int64_t k = 0; k < n; ++k) values.push_back(ints[take(i, ints.size(), "int")]);
        step.args.emplace_back(values);
      } else if (kind == c10::TypeKind::BoolType) {
        step.args.emplace_back(bools.get(take(b, bools.size(), "bool")));
      } else if (kind == c10::TypeKind::FloatType) {
        step.args.emplace_back(floats[take(f, floats.size(), "float")]);
      } else if (kind == c10::TypeKind::NumberType) {  // a Scalar, recorded as a float
        step.args.emplace_back(c10::Scalar(floats[take(f, floats.size(), "float")]));
      } else if (kind == c10::TypeKind::OptionalType) {
        // Another optional argument: -1 for None, else a dtype (c10::ScalarType's value).
        const int64_t code = ints[take(i, ints.size(), "int")];
        if (code < 0) {
          step.args.emplace_back();
        } else {
          const auto& real = arg.real_type();
          TORCH_CHECK(real->kind() == c10::TypeKind::OptionalType &&
                          real->castRaw<c10::OptionalType>()->getElementType()->kind() ==
                              c10::TypeKind::ScalarTypeType &&
                          code < static_cast<int64_t>(c10::ScalarType::NumOptions),
                      "OpPlan.add_step: ", name, "'s argument ", arg.name(), " of type ",
                      arg.real_type()->str(), " holds only None here, got ", code);
          step.args.emplace_back(static_cast<c10::ScalarType>(code));
        }
      } else {
        TORCH_CHECK(false, "OpPlan.add_step: ", name, "'s argument ", arg.name(), " has type ",
                    arg.real_type()->str(), ", which a plan does not hold");
      }
    }
    TORCH_CHECK(t == tensors.size() && i == ints.size() && b == bools.size() &&
                    f == floats.size(),
                "OpPlan.add_step: more arguments given than ", name, " takes");
    const auto& returns = schema.returns();
    TORCH_CHECK(returns.empty() || (returns.size() == 1 &&
                                    returns[0].type()->kind() == c10::TypeKind::TensorType),
                "OpPlan.add_step: ", name, " returns ", returns.size(),
                " values; a plan holds ops returning one tensor or none");
    if (!returns.empty()) step.out_slot = slots_++;
    steps_.push_back(std::move(step));
    return steps_.back().out_slot;
  }

  // Marks the slots whose tensors run() returns; call once, after the last add_step.
  void finish(const std::vector<int64_t>& outputs) {
    outputs_ = outputs;
    std::vector<int64_t> last(slots_, -1);
    for (const auto& [slot, step] : reads_) last[slot] = step;
    for (int64_t slot : outputs) last[slot] = -1;
    for (int64_t slot = 0; slot < slots_; ++slot) {
      if (last[slot] >= 0) steps_[last[slot]].release.push_back(slot);
    }
  }

  std::vector<Tensor> run(const std::vector<Tensor>& inputs) {
    TORCH_CHECK(static_cast<int64_t>(inputs.size()) == inputs_, "OpPlan.run: expected ",
                inputs_, " inputs (as the plan was made for), got ", inputs.size());
    std::vector<Tensor> values(slots_);
    for (size_t k = 0; k < inputs.size(); ++k) values[k] = inputs[k];
    torch::jit::Stack stack;
    for (auto& step : steps_) {
      stack.assign(step.args.begin(), step.args.end());
      for (const auto& [arg, slot] : step.slot_args) stack[arg] = values[slot];
      step.op.callBoxed(stack);
      if (step.out_slot >= 0) values[step.out_slot] = std::move(stack[0]).toTensor();
      stack.clear();
      for (int64_t slot : step.release) values[slot].reset();  // as the Python walk frees it
    }
    std::vector<Tensor> out;
    for (int64_t slot : outputs_) out.push_back(values[slot]);
    return out;
  }

 private:
  int64_t inputs_;
  int64_t slots_;
  std::vector<Step> steps_;
  std::vector<std::pair<int64_t, int64_t>> reads_;  // (slot, step that reads it)
  std::vector<int64_t> outputs_;
};

namespace {

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.class_<OpPlan>("OpPlan")
      .def(torch::init<int64_t>())
      .def("add_step", &OpPlan::add_step)
      .def("finish", &OpPlan::finish)
      .def("run", &OpPlan::run);
}

// The replay's entry from Python, as plain C functions. A forward's call of a TorchScript
// class method costs ~0.1 ms with its code out of cache (as after the forward before it, AMD
// EPYC Zen 4), a plain C call a few us.
constexpr const char* kCapsule = "resnet_fused.OpPlan";
using PlanPtr = c10::intrusive_ptr<OpPlan>;

PlanPtr* plan_of(PyObject* capsule) {
  return static_cast<PlanPtr*>(PyCapsule_GetPointer(capsule, kCapsule));
}

// plan_handle(plan): a capsule holding the OpPlan of a torch.classes.resnet_fused.OpPlan.
PyObject* plan_handle(PyObject*, PyObject* obj) {
  HANDLE_TH_ERRORS
  torch::jit::Object object;
  try {
    object = pybind11::cast<torch::jit::Object>(pybind11::handle(obj));
  } catch (const pybind11::cast_error&) {
    PyErr_Format(PyExc_TypeError, "plan_handle: expected a torch.classes.resnet_fused.OpPlan, "
                 "got %s", Py_TYPE(obj)->tp_name);
    return nullptr;
  }
  auto* plan = new PlanPtr(c10::IValue(object._ivalue()).toCustomClass<OpPlan>());
  PyObject* capsule = PyCapsule_New(plan, kCapsule, [](PyObject* c) { delete plan_of(c); });
  if (capsule == nullptr) delete plan;
  return capsule;
  END_HANDLE_TH_ERRORS
}

// run_plan(handle, input): OpPlan.run([input]), the GIL released as TorchScript's call does.
PyObject* run_plan_entry(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *capsule, *input;
  if (!PyArg_ParseTuple(args, "OO:run_plan", &capsule, &input)) return nullptr;
  PlanPtr* plan = plan_of(capsule);
  if (plan == nullptr) return nullptr;
  if (!THPVariable_Check(input)) {
    PyErr_Format(PyExc_TypeError, "run_plan: expected a tensor input, got %s",
                 Py_TYPE(input)->tp_name);
    return nullptr;
  }
  std::vector<Tensor> outputs;
  {
    pybind11::gil_scoped_release no_gil;
    outputs = (*plan)->run({THPVariable_Unpack(input)});
  }
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(outputs.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < outputs.size(); ++i) {
    PyObject* t = THPVariable_Wrap(std::move(outputs[i]));
    if (t == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), t);
  }
  return list;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"plan_handle", plan_handle, METH_O,
     "plan_handle(plan): a handle for run_plan of a torch.classes.resnet_fused.OpPlan."},
    {"run_plan", run_plan_entry, METH_VARARGS,
     "run_plan(handle, input): the plan's outputs for input, as OpPlan.run([input])."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

OpPlan* plan_from_handle(PyObject* handle) {
  PlanPtr* plan = plan_of(handle);
  return plan == nullptr ? nullptr : plan->get();
}

std::vector<at::Tensor> run_plan(OpPlan& plan, const at::Tensor& input) {
  return plan.run({input});
}

PyMethodDef* op_plan_methods() { return methods; }

}  // namespace resnet_fused
