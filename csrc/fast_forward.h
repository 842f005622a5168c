// The _C module's fast_forward (fast_forward.cpp), for resnet_fused/model.py.
#pragma once

#include <Python.h>

namespace resnet_fused {

PyMethodDef* fast_forward_methods();

}  // namespace resnet_fused
