// Device facts the launchers use to size their grids (never their reduction order).
#include <atomic>

#include "device_utils.cuh"

namespace margingate::cuda::detail {

int current_device_sms() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return 1;
  if (device < kMaxDevices && cached[device].load(std::memory_order_relaxed) > 0) {
    return cached[device].load(std::memory_order_relaxed);
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 1;
  if (device < kMaxDevices) cached[device].store(sms, std::memory_order_relaxed);  // same value from every writer
  return sms;
}

}  // namespace margingate::cuda::detail
