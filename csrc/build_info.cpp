// fastprompt_ext::build_info: what this build of the library is, for `fastprompt info`.
#include <string>

#include "cpu/blas.h"
#include "ops.h"

#if __has_include("fastprompt_build_config.h")
#include "fastprompt_build_config.h"
#endif

#ifndef FASTPROMPT_CPU_ISA
#define FASTPROMPT_CPU_ISA "default"
#endif

namespace fastprompt {

std::string build_info() {
  std::string s = "cpu_isa=" FASTPROMPT_CPU_ISA "; gemm=" + cpu::gemm_provider();
#ifdef FASTPROMPT_WITH_CUDA
  s += "; cuda=yes";
#ifdef FASTPROMPT_CUDA_ARCHS
  s += "; cuda_archs=" FASTPROMPT_CUDA_ARCHS;
#endif
#else
  s += "; cuda=no";
#endif
  return s;
}

}  // namespace fastprompt
