# The torch installed in this Python, as an interface target fastad::torch.
#
# torch's own CMake config is not used: with a CUDA build of torch it insists on finding a full
# CUDA toolkit even when we only want CPU kernels. Headers, libraries and the C++ ABI flag are
# all we need, and torch reports them itself.
#
# Out: fastad::torch, FASTAD_TORCH_VERSION, TORCH_CUDA_VERSION ("" for CPU-only torch),
#      TORCH_SITE_PACKAGES, TORCH_LIB_DIR

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; d = os.path.dirname(torch.__file__); print(torch.__version__); print(torch.version.cuda or 'none'); print(os.path.dirname(d)); print(d); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _facts OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _rc ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "fastad: could not import torch with ${Python_EXECUTABLE} (install torch first):\n${_err}")
endif()
string(REPLACE "\n" ";" _facts "${_facts}")
list(GET _facts 0 FASTAD_TORCH_VERSION)
list(GET _facts 1 TORCH_CUDA_VERSION)
list(GET _facts 2 TORCH_SITE_PACKAGES)
list(GET _facts 3 _torch_dir)
list(GET _facts 4 _torch_abi)
if(TORCH_CUDA_VERSION STREQUAL "none")
  set(TORCH_CUDA_VERSION "")
endif()
set(TORCH_LIB_DIR "${_torch_dir}/lib")

add_library(fastad_torch INTERFACE)
add_library(fastad::torch ALIAS fastad_torch)
target_include_directories(fastad_torch SYSTEM INTERFACE
  "${_torch_dir}/include" "${_torch_dir}/include/torch/csrc/api/include")
target_compile_definitions(fastad_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_torch_abi})
foreach(_lib c10 torch_cpu torch torch_python)
  find_library(FASTAD_LIB_${_lib} ${_lib} PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH NO_CACHE REQUIRED)
  target_link_libraries(fastad_torch INTERFACE "${FASTAD_LIB_${_lib}}")
endforeach()
message(STATUS "fastad: torch ${FASTAD_TORCH_VERSION} at ${_torch_dir}")
