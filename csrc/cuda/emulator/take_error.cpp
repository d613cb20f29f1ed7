// The emulator's error report for ctypes callers: the first error since the last call (empty when none), then clears it.
#include <cuda_runtime.h>

#include <string>

extern "C" const char* fastbon_emulated_take_error() {
  static std::string message;
  message = fastbon_emulator::state().error;
  fastbon_emulator::state().error.clear();
  return message.c_str();
}
