// The Python module fastad._C. Importing it loads the shared library, whose static initialisers
// register every op with the dispatcher; the module itself only reports how it was built.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#ifndef FASTAD_WITH_CUDA
#define FASTAD_WITH_CUDA 0
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastad compiled kernels (ops are registered under torch.ops.fastad)";
  m.def("build_info", []() {
    py::dict info;
    info["version"] = FASTAD_VERSION;
    info["torch_version"] = FASTAD_TORCH_VERSION;
    info["cuda"] = static_cast<bool>(FASTAD_WITH_CUDA);
    info["cuda_archs"] = FASTAD_CUDA_ARCHS;
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["threads"] = at::get_num_threads();
    info["parallel_info"] = at::get_parallel_info();
    return info;
  });
}
