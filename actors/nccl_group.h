// NcclGroup: one epoch of the weight-broadcast communicator (docs/weights.md).
//
// Every NCCL call here is non-blocking (config.blocking = 0) and every wait
// polls against a deadline and a cancel check: init polls
// ncclCommGetAsyncError, a broadcast polls cudaStreamQuery and the async
// error. A deadline, a cancel or an NCCL error aborts the communicator
// (ncclCommAbort) and returns DeadlineExceeded, Aborted or Unavailable; the
// group is then broken for good and its owner forms the next epoch. No call
// hangs on a dead peer.
//
// Host code includes this header without nvcc: device memory is void* and
// the CUDA stream and NCCL communicator stay inside the .cc.
// NCCL allows one rank per GPU per communicator.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "base/result.h"

namespace grove::actors {

using NcclClock = std::chrono::steady_clock;
using NcclDeadline = NcclClock::time_point;
// Polled while waiting; true: give up now (e.g. the coordinator moved the
// group to a new epoch). May be empty.
using NcclCancel = std::function<bool()>;

inline NcclDeadline NcclDeadlineIn(int64_t ms) { return NcclClock::now() + std::chrono::milliseconds(ms); }

class NcclGroup {
 public:
  // A fresh NCCL unique id (its raw bytes) for rank 0 to hand out.
  static Result<std::string> NewUniqueId();

  // Joins the communicator named by `unique_id` as `rank` of `size` on CUDA
  // device `device`. Sets NCCL_NVLS_ENABLE=0 in this process unless it is
  // set already (NVLink multicast is off on the machines we share).
  static Result<std::unique_ptr<NcclGroup>> Form(const std::string& unique_id, int rank, int size,
                                                 int device, NcclDeadline deadline,
                                                 const NcclCancel& cancelled = nullptr);
  ~NcclGroup();  // destroys the communicator (aborts it if broken)
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

  // Broadcasts `bytes` at device address `data` from rank 0 to every rank,
  // as consecutive buckets of at most `bucket_bytes`, all enqueued on the
  // group's stream and then waited for (so buckets pipeline). Every rank
  // calls it with the same bytes and bucket size. bucket_bytes == 0: one
  // ncclBroadcast of the whole buffer (the benchmark's baseline).
  Status Broadcast(void* data, size_t bytes, size_t bucket_bytes, NcclDeadline deadline,
                   const NcclCancel& cancelled = nullptr);

  // Aborts the communicator (idempotent). Safe while a broadcast is stuck
  // on a dead peer: ncclCommAbort makes NCCL's kernels return.
  void Abort();

  bool broken() const { return broken_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  // The group's CUDA stream (a cudaStream_t), for callers that enqueue
  // copies in order with the broadcasts.
  void* stream() const { return stream_; }

  // Waits for everything enqueued on stream() so far, under the same rules
  // as Broadcast (deadline, cancel, NCCL async error: abort).
  Status Wait(NcclDeadline deadline, const NcclCancel& cancelled, const char* what);

 private:
  NcclGroup(int rank, int size, int device) : rank_(rank), size_(size), device_(device) {}
  Status Fail(Status why);

  int rank_, size_, device_;
  void* comm_ = nullptr;    // ncclComm_t
  void* stream_ = nullptr;  // cudaStream_t
  bool broken_ = false;
};

// Number of CUDA devices (0 when there is no driver or no GPU).
int CudaDeviceCount();
// Creates this process's CUDA context on `device` now (it takes a moment),
// so that it is not paid inside the first deadline.
Status InitCudaDevice(int device);

}  // namespace grove::actors
