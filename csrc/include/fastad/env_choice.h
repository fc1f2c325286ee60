// The one override convention of the kernels: an environment variable (FASTAD_<OP>_CPU_ISA,
// FASTAD_<OP>_CUDA_PATH) names one of an op's kernel paths, so that the tests and benchmarks reach
// every path on one machine. Host code only; no CPU or CUDA specifics, so .cpp and .cu files share
// it.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdlib>
#include <initializer_list>
#include <string>

namespace fastad {

// `choices` lists the paths from the least to the default (the last). Unset or empty means the
// default; any other value than a listed one raises ValueError naming the choices, default first.
// The variable is read on every call, so a test can change it between calls. Returns the index of
// the choice in `choices`.
inline size_t env_choice(const char* env_name, std::initializer_list<const char*> choices) {
  const char* env = std::getenv(env_name);
  const std::string chosen = env ? env : "";
  if (chosen.empty()) return choices.size() - 1;
  size_t index = 0;
  for (const char* choice : choices) {
    if (chosen == choice) return index;
    ++index;
  }
  std::string named;  // "avx512, avx2 or portable"
  for (size_t i = choices.size(); i-- > 0;) {
    named += choices.begin()[i];
    named += i > 1 ? ", " : (i == 1 ? " or " : "");
  }
  C10_THROW_ERROR(ValueError, c10::str(env_name, " must be ", named, ", got '", chosen, "'"));
}

}  // namespace fastad
