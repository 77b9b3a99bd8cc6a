// The Python module `ms_fused._C` (or `ms_fused_C` when JIT-built). It is imported only for its side
// effect: loading the library runs the TORCH_LIBRARY registrations of the ms_fused ops.
#include <Python.h>

#define MS_FUSED_STR2(x) #x
#define MS_FUSED_STR(x) MS_FUSED_STR2(x)
#define MS_FUSED_CAT(a, b) a##b
#define MS_FUSED_INIT(name) MS_FUSED_CAT(PyInit_, name)

static PyModuleDef ms_fused_module = {
    PyModuleDef_HEAD_INIT, MS_FUSED_STR(TORCH_EXTENSION_NAME),
    "Registers the torch ops ms_fused::ms_forward and ms_fused::ms_backward (CPU).", -1, nullptr,
};

PyMODINIT_FUNC MS_FUSED_INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&ms_fused_module); }
