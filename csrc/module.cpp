// The Python module `citrus_ext._C` (pybind11). Importing it loads the shared library, whose
// static initialisers register the `citrus` ops with the dispatcher; the ops themselves are
// reached through torch.ops.citrus.*, so the module only reports how it was built.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "citrus_ext compiled ops (registered as torch.ops.citrus.*)";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
