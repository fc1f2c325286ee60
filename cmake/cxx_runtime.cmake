# One C++ runtime per process: the extension must use the shared libstdc++ that torch uses.
#
# Why: a module that carries its own copy of libstdc++ (a compiler that links it statically,
# LDFLAGS=-static-libstdc++, a wrapper adding it) shares a process with torch's shared copy.
# Exceptions and streams then cross two runtimes: every TORCH_CHECK failure crashed the process
# or came out cut at its first number. So such a module is refused, twice:
#   - at configure time, a probe library linked like the extension (same compiler and flags) is
#     inspected, so the build stops before compiling anything;
#   - after linking, the module itself is inspected (POST_BUILD), which also catches flags that
#     reach only the real link, and a refused module is deleted.
#
# Included from CMakeLists.txt: defines fastad_check_cxx_runtime() and runs the probe.
# Run as a script: cmake -DFASTAD_MODULE=<file> -DFASTAD_READELF=<readelf>
#   -DFASTAD_COMPILER_DESC=<text> -P cmake/cxx_runtime.cmake     (exit code != 0 when refused)

# Sets ${out_var} to "" when `file` links the shared libstdc++ and carries no runtime of its own,
# to "UNREADABLE: <why>" when readelf could not read it (no verdict), else to a sentence saying
# what is wrong.
function(fastad_cxx_runtime_problem file readelf out_var)
  execute_process(COMMAND "${readelf}" -d -W "${file}" OUTPUT_VARIABLE _dyn ERROR_VARIABLE _err
                  RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    set(${out_var} "UNREADABLE: ${readelf} could not read ${file} (exit code ${_rc}): ${_err}" PARENT_SCOPE)
    return()
  endif()
  # Defined (not UND) runtime symbols: the exception machinery and the stream inserters that
  # c10's message formatting uses. In a module that links the shared runtime they are imports.
  execute_process(COMMAND "${readelf}" -s -W "${file}" OUTPUT_VARIABLE _syms ERROR_VARIABLE _err
                  RESULT_VARIABLE _rc)
  set(_own "")
  foreach(_sym __cxa_throw __cxa_allocate_exception _ZNSo9_M_insertIlEERSoT_ _ZNSt8ios_base4InitC1Ev)
    # readelf -s columns: Num: Value Size Type Bind Vis Ndx Name
    if(_syms MATCHES "[ \t](FUNC|OBJECT)[ \t]+[A-Z]+[ \t]+[A-Z]+[ \t]+[0-9]+[ \t]+${_sym}[\n@ ]")
      list(APPEND _own "${_sym}")
    endif()
  endforeach()
  if(NOT _dyn MATCHES "\\(NEEDED\\)[^\n]*\\[libstdc\\+\\+\\.so")
    set(_what "does not link the shared C++ runtime (no libstdc++.so among its NEEDED libraries)")
    if(_dyn MATCHES "\\(NEEDED\\)[^\n]*\\[(libc\\+\\+\\.so[^]]*)\\]")
      set(_what "links ${CMAKE_MATCH_1} instead of the libstdc++.so that torch uses")
    elseif(_own)
      set(_what "carries its own copy of the C++ runtime (libstdc++ linked statically)")
    endif()
    set(${out_var} "${_what}" PARENT_SCOPE)
  elseif(_own)
    string(REPLACE ";" ", " _own "${_own}")
    set(${out_var} "defines C++ runtime symbols itself (${_own}) besides linking libstdc++.so"
        PARENT_SCOPE)
  else()
    set(${out_var} "" PARENT_SCOPE)
  endif()
endfunction()

# The one message a refused build prints.
function(fastad_cxx_runtime_refuse what problem compiler_desc advice)
  message(FATAL_ERROR
    "fastad: ${what} ${problem}.\n"
    "The C++ compiler is ${compiler_desc}.\n"
    "torch's libraries use the shared libstdc++.so.6; an extension with a second C++ runtime "
    "crashes or truncates every error message it raises. Build with a compiler that links the "
    "shared libstdc++: remove -static-libstdc++ (and -static) from LDFLAGS, CXXFLAGS and "
    "CMAKE_*_LINKER_FLAGS, or set CXX to another compiler${advice}, then build again in a fresh "
    "build folder.")
endfunction()

if(CMAKE_SCRIPT_MODE_FILE)
  # POST_BUILD: inspect the linked module; delete it when refused so nothing installs it.
  fastad_cxx_runtime_problem("${FASTAD_MODULE}" "${FASTAD_READELF}" _problem)
  if(_problem MATCHES "^UNREADABLE: (.*)")
    # No verdict: keep the module (it may be fine) but do not pass it unchecked.
    message(FATAL_ERROR "fastad: cannot check which C++ runtime the linked module uses: ${CMAKE_MATCH_1}\n"
            "Install binutils (readelf), or configure again in a fresh build folder if the cached "
            "CMAKE_READELF is stale.")
  elseif(_problem)
    file(REMOVE "${FASTAD_MODULE}")
    fastad_cxx_runtime_refuse("the linked module ${FASTAD_MODULE}" "${_problem}"
                              "${FASTAD_COMPILER_DESC}" "")
  endif()
  return()
endif()

# After linking, the module itself (a no-op where readelf is missing: the configure step said so).
function(fastad_check_cxx_runtime target)
  if(NOT FASTAD_READELF)
    return()
  endif()
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND "${CMAKE_COMMAND}" "-DFASTAD_MODULE=$<TARGET_FILE:${target}>"
            "-DFASTAD_READELF=${FASTAD_READELF}" "-DFASTAD_COMPILER_DESC=${FASTAD_COMPILER_DESC}"
            -P "${CMAKE_CURRENT_FUNCTION_LIST_FILE}"
    VERBATIM)
endfunction()

# ---- configure time ----
if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
  return()  # the check reads ELF files; other systems ship one C++ runtime per toolchain
endif()
set(FASTAD_READELF "${CMAKE_READELF}")
if(NOT FASTAD_READELF)
  find_program(FASTAD_READELF readelf)
endif()
if(NOT FASTAD_READELF)
  message(WARNING "fastad: readelf not found; cannot check that the extension links the shared C++ runtime")
  return()
endif()
set(FASTAD_COMPILER_DESC "${CMAKE_CXX_COMPILER} (${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION})")
# LDFLAGS seeds both; show each distinct value once.
set(_fastad_ld_shown "${CMAKE_MODULE_LINKER_FLAGS}")
if(NOT CMAKE_SHARED_LINKER_FLAGS STREQUAL CMAKE_MODULE_LINKER_FLAGS)
  string(APPEND _fastad_ld_shown " ${CMAKE_SHARED_LINKER_FLAGS}")
endif()
string(STRIP "${_fastad_ld_shown}" _fastad_ld_shown)
if(_fastad_ld_shown)
  string(APPEND FASTAD_COMPILER_DESC ", linker flags '${_fastad_ld_shown}'")
endif()

# Links a probe library with `compiler` and the flags the extension gets; sets out_var to the
# problem found ("" when none), or to "SKIP" when the probe does not build at all.
function(_fastad_probe_compiler compiler out_var)
  set(_dir "${CMAKE_BINARY_DIR}/fastad_cxx_runtime_probe")
  file(MAKE_DIRECTORY "${_dir}")
  file(WRITE "${_dir}/probe.cpp"
    "#include <sstream>\n#include <stdexcept>\n#include <string>\n"
    "std::string fastad_probe(long v) {\n  std::ostringstream s;\n  s << \"value \" << v;\n"
    "  if (v < 0) throw std::runtime_error(s.str());\n  return s.str();\n}\n")
  separate_arguments(_cxx_flags UNIX_COMMAND "${CMAKE_CXX_FLAGS}")
  separate_arguments(_ld_flags UNIX_COMMAND "${CMAKE_MODULE_LINKER_FLAGS} ${CMAKE_SHARED_LINKER_FLAGS}")
  execute_process(COMMAND "${compiler}" ${_cxx_flags} -fPIC -shared "${_dir}/probe.cpp"
                          -o "${_dir}/probe.so" ${_ld_flags}
                  RESULT_VARIABLE _rc OUTPUT_QUIET ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0)
    set(${out_var} "SKIP" PARENT_SCOPE)
    return()
  endif()
  fastad_cxx_runtime_problem("${_dir}/probe.so" "${FASTAD_READELF}" _problem)
  set(${out_var} "${_problem}" PARENT_SCOPE)
endfunction()

_fastad_probe_compiler("${CMAKE_CXX_COMPILER}" _problem)
if(_problem STREQUAL "SKIP")
  message(STATUS "fastad: the C++ runtime probe did not link; the linked module is checked instead")
elseif(_problem MATCHES "^UNREADABLE: (.*)")
  message(WARNING "fastad: the C++ runtime probe could not be inspected (${CMAKE_MATCH_1}); "
                  "the linked module is checked instead")
elseif(_problem)
  # Name a compiler on this machine that would work, if there is one.
  set(_advice "")
  file(REAL_PATH "${CMAKE_CXX_COMPILER}" _current)
  foreach(_candidate /usr/bin/g++ /usr/bin/c++ /usr/bin/clang++)
    if(EXISTS "${_candidate}")
      file(REAL_PATH "${_candidate}" _real)
      if(NOT _real STREQUAL _current)
        _fastad_probe_compiler("${_candidate}" _other)
        if(_other STREQUAL "")
          set(_advice " (${_candidate} here links the shared runtime: CXX=${_candidate})")
          break()
        endif()
      endif()
    endif()
  endforeach()
  fastad_cxx_runtime_refuse("a library linked like the extension" "${_problem}"
                            "${FASTAD_COMPILER_DESC}" "${_advice}")
else()
  message(STATUS "fastad: the extension links the shared C++ runtime (checked with ${FASTAD_READELF})")
endif()
