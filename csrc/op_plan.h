// The _C module's functions for resnet_fused/op_plan.py, and the replay for the fused
// forward's C entry (op_plan.cpp).
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>

#include <vector>

namespace resnet_fused {

class OpPlan;

PyMethodDef* op_plan_methods();

// With the GIL held: the plan behind a handle of _C.plan_handle (which keeps it alive), or
// nullptr with a Python error set.
OpPlan* plan_from_handle(PyObject* handle);

// Its outputs for one input; needs no GIL.
std::vector<at::Tensor> run_plan(OpPlan& plan, const at::Tensor& input);

}  // namespace resnet_fused
