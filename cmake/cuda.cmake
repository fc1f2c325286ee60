# Decide whether the CUDA kernels are built, and prepare the toolkit so that torch's own CMake
# config (which uses the old FindCUDA and CUDAToolkit modules) finds every piece it needs.
#
# In:  FASTAD_CUDA (auto|on|off), TORCH_CUDA_VERSION ("" for a CPU-only torch), _site_packages
# Out: FASTAD_WITH_CUDA (ON/OFF), FASTAD_CUDA_ARCHS (the TORCH_CUDA_ARCH_LIST used)

set(FASTAD_WITH_CUDA OFF)
set(FASTAD_CUDA_ARCHS "")

function(_fastad_no_cuda why)
  if(FASTAD_CUDA STREQUAL "on")
    message(FATAL_ERROR "fastad: FASTAD_CUDA=on but ${why}")
  endif()
  message(STATUS "fastad: building CPU kernels only: ${why}")
endfunction()

if(FASTAD_CUDA STREQUAL "off")
  message(STATUS "fastad: building CPU kernels only: FASTAD_CUDA=off")
  return()
endif()
if(NOT TORCH_CUDA_VERSION)
  _fastad_no_cuda("torch ${FASTAD_TORCH_VERSION} is a CPU-only build")
  return()
endif()

# Find nvcc: CUDA_HOME, then CMAKE_CUDA_COMPILER, then PATH and the usual places.
set(_nvcc "")
if(DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
  set(_nvcc "$ENV{CUDA_HOME}/bin/nvcc")
elseif(CMAKE_CUDA_COMPILER AND EXISTS "${CMAKE_CUDA_COMPILER}")
  set(_nvcc "${CMAKE_CUDA_COMPILER}")
else()
  find_program(_fastad_nvcc nvcc PATHS /usr/local/cuda/bin NO_CACHE)
  if(_fastad_nvcc)
    set(_nvcc "${_fastad_nvcc}")
  endif()
endif()
if(NOT _nvcc)
  _fastad_no_cuda("torch ${FASTAD_TORCH_VERSION} has CUDA ${TORCH_CUDA_VERSION} but no CUDA compiler (nvcc) was found; set CUDA_HOME or put nvcc on PATH to build the CUDA kernels")
  return()
endif()

# nvcc on PATH may be a symlink or a wrapper script, so ask nvcc itself where its toolkit is.
file(WRITE "${CMAKE_BINARY_DIR}/fastad_probe.cu" "__global__ void fastad_probe() {}\n")
execute_process(COMMAND "${_nvcc}" -v --dryrun -c "${CMAKE_BINARY_DIR}/fastad_probe.cu"
                -o "${CMAKE_BINARY_DIR}/fastad_probe.o"
                ERROR_VARIABLE _nvcc_out OUTPUT_VARIABLE _nvcc_out2 RESULT_VARIABLE _nvcc_rc)
string(REGEX MATCH "#\\$ TOP=([^\n]*)" _top "${_nvcc_out}${_nvcc_out2}")
if(NOT _nvcc_rc EQUAL 0 OR NOT CMAKE_MATCH_1)
  _fastad_no_cuda("${_nvcc} did not run (${_nvcc_rc})")
  return()
endif()
file(REAL_PATH "${CMAKE_MATCH_1}" _cuda_root)
message(STATUS "fastad: CUDA toolkit at ${_cuda_root} (from ${_nvcc})")

set(CUDA_TOOLKIT_ROOT_DIR "${_cuda_root}" CACHE PATH "" FORCE)
set(CUDAToolkit_ROOT "${_cuda_root}")
set(CMAKE_CUDA_COMPILER "${_cuda_root}/bin/nvcc" CACHE FILEPATH "" FORCE)
set(ENV{CUDA_HOME} "${_cuda_root}")

# A toolkit with only nvcc + cudart: take nvrtc and cuBLAS from torch's nvidia wheels.
file(GLOB _wheel_cuda_dirs "${_site_packages}/nvidia/cu[0-9]*" "${_site_packages}/nvidia/cuda_nvrtc")
set(FASTAD_WHEEL_CUDA_INCLUDES "")
foreach(_lib nvrtc cublas cublasLt)
  find_library(_probe_${_lib} ${_lib} PATHS "${_cuda_root}/lib64" "${_cuda_root}/lib" NO_DEFAULT_PATH NO_CACHE)
  if(NOT _probe_${_lib})
    foreach(_d ${_wheel_cuda_dirs})
      file(GLOB _cand "${_d}/lib/lib${_lib}.so*")
      list(FILTER _cand EXCLUDE REGEX "builtins|alt")
      if(_cand)
        list(GET _cand 0 _first)
        set(CUDA_${_lib}_LIBRARY "${_first}" CACHE FILEPATH "" FORCE)
        list(APPEND FASTAD_WHEEL_CUDA_INCLUDES "${_d}/include")
        break()
      endif()
    endforeach()
  endif()
endforeach()
list(REMOVE_DUPLICATES FASTAD_WHEEL_CUDA_INCLUDES)

# torch's config ignores CMAKE_CUDA_ARCHITECTURES and reads TORCH_CUDA_ARCH_LIST.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} OR "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0+PTX")
endif()
set(FASTAD_CUDA_ARCHS "$ENV{TORCH_CUDA_ARCH_LIST}")
enable_language(CUDA)
# enable_language fills CMAKE_CUDA_ARCHITECTURES, which torch's config warns about and ignores.
unset(CMAKE_CUDA_ARCHITECTURES)
unset(CMAKE_CUDA_ARCHITECTURES CACHE)
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(FASTAD_WITH_CUDA ON)
message(STATUS "fastad: building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST=${FASTAD_CUDA_ARCHS}")
