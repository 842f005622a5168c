// The _C module's functions for resnet_fused/state_watch.py (state_watch.cpp).
#pragma once

#include <Python.h>

namespace resnet_fused {

PyMethodDef* state_watch_methods();

// For a capsule of _C.state_watch: 1 if anything it watches changed, 0 if not, -1 with a
// Python error set.
int state_watch_changed(PyObject* capsule);

}  // namespace resnet_fused
