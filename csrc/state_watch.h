// The _C module's functions for resnet_fused/state_watch.py (state_watch.cpp).
#pragma once

#include <Python.h>

namespace resnet_fused {

PyMethodDef* state_watch_methods();

}  // namespace resnet_fused
