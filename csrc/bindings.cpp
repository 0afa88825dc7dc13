// SPDX-License-Identifier: Apache-2.0
// The only pybind11 file.  Python passes raw device pointers as integers, int64 sizes/strides, a dtype code
// (lipforcing::DType) and the CUDA stream handle; every launcher returns cudaError_t, turned here into a
// RuntimeError carrying cudaGetErrorString.  Bad arguments raise ValueError (std::invalid_argument).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "lipforcing/common.h"
#include "lipforcing/runtime.h"

namespace py = pybind11;

namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lipforcing._C.") + what + ": CUDA error " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

// Raises RuntimeError unless a CUDA device can be used; called before every launch.
void require_device(const char* what) {
  int n = 0;
  cudaError_t err = lipforcing::device_count(&n);
  check_cuda(err, what);
  if (n == 0) {
    throw std::runtime_error(std::string("lipforcing._C.") + what + ": no CUDA device is visible");
  }
}

int device_count_or_zero() {
  int n = 0;
  if (lipforcing::device_count(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lipforcing CUDA kernels (torch-free; raw pointers + stream handles)";
  m.def("device_count", &device_count_or_zero, "Number of visible CUDA devices (0 when none or no driver).");
  m.def("runtime_version", &lipforcing::runtime_version, "CUDA runtime version the extension was built with.");
  m.def(
      "require_device", [](const std::string& what) { require_device(what.c_str()); }, py::arg("what"),
      "Raise RuntimeError with the CUDA error string unless a CUDA device is usable.");

  // --- op bindings: each op adds its own block below (chunk_attention, audio_cross_attention, denoise_update) ---
}
