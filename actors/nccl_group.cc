#include "actors/nccl_group.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <cuda_runtime_api.h>
#include <glog/logging.h>
#include <nccl.h>

#include "actors/cuda_status.h"

namespace grove::actors {
namespace {

// How often a wait looks at the stream, the async error and the clock:
// short against a bucket's transfer time (a 64 MiB bucket takes ~0.3 ms
// over NVLink), long enough not to burn a core.
constexpr auto kPollInterval = std::chrono::microseconds(50);

ncclComm_t Comm(void* p) { return static_cast<ncclComm_t>(p); }
cudaStream_t Stream(void* p) { return static_cast<cudaStream_t>(p); }

std::string NcclError(const char* what, ncclResult_t r, ncclComm_t comm) {
  std::string s = std::string(what) + ": " + ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') s += " (" + std::string(last) + ")";
  return s;
}

bool Expired(NcclDeadline deadline) { return NcclClock::now() >= deadline; }

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

Status InitCudaDevice(int device) {
  if (device < 0 || device >= CudaDeviceCount()) {
    return Status::InvalidArgument("CUDA device " + std::to_string(device) + " does not exist");
  }
  cudaError_t e = cudaSetDevice(device);
  if (e == cudaSuccess) e = cudaFree(nullptr);
  return CudaStatus(e, "CUDA init", StatusCode::kUnavailable);
}

Result<std::string> NcclGroup::NewUniqueId() {
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return Status::Unavailable(NcclError("ncclGetUniqueId", r, nullptr));
  return std::string(id.internal, sizeof(id.internal));
}

Result<std::unique_ptr<NcclGroup>> NcclGroup::Form(const std::string& unique_id, int rank, int size,
                                                   int device, NcclDeadline deadline,
                                                   const NcclCancel& cancelled) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return Status::InvalidArgument("NCCL unique id has " + std::to_string(unique_id.size()) +
                                   " bytes, expected " + std::to_string(sizeof(id.internal)));
  }
  if (size < 1 || rank < 0 || rank >= size) {
    return Status::InvalidArgument("NCCL rank " + std::to_string(rank) + " of size " + std::to_string(size));
  }
  if (device < 0 || device >= CudaDeviceCount()) {
    return Status::InvalidArgument("CUDA device " + std::to_string(device) + " does not exist");
  }
  // NVLink multicast (NVLS) can take a shared host's GPUs out of service.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));

  std::unique_ptr<NcclGroup> g(new NcclGroup(rank, size, device));
  if (cudaSetDevice(device) != cudaSuccess) return Status::Unavailable("cudaSetDevice failed");
  cudaStream_t stream;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
    return Status::ResourceExhausted("cudaStreamCreate failed");
  }
  g->stream_ = stream;

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  g->comm_ = comm;
  if (r != ncclSuccess && r != ncclInProgress) {
    return g->Fail(Status::Unavailable(NcclError("ncclCommInitRankConfig", r, comm)));
  }
  for (;;) {
    ncclResult_t state;
    r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return g->Fail(Status::Unavailable(NcclError("ncclCommGetAsyncError", r, comm)));
    if (state == ncclSuccess) break;
    if (state != ncclInProgress) {
      return g->Fail(Status::Unavailable(NcclError("NCCL init", state, comm)));
    }
    if (Expired(deadline)) {
      return g->Fail(Status::DeadlineExceeded("NCCL init of rank " + std::to_string(rank) + " of " +
                                              std::to_string(size) + " missed its deadline"));
    }
    if (cancelled && cancelled()) return g->Fail(Status::Aborted("NCCL init cancelled"));
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return g;
}

NcclGroup::~NcclGroup() {
  // Abort rather than destroy: a destroy may wait on peers that are gone
  // (the usual reason for dropping an epoch); an abort never does.
  Abort();
  if (stream_ != nullptr) {
    cudaSetDevice(device_);
    cudaStreamDestroy(Stream(stream_));
  }
}

void NcclGroup::Abort() {
  if (comm_ == nullptr) return;
  cudaSetDevice(device_);
  ncclResult_t r = ncclCommAbort(Comm(comm_));
  if (r != ncclSuccess && r != ncclInProgress) LOG(WARNING) << "ncclCommAbort: " << ncclGetErrorString(r);
  comm_ = nullptr;
  broken_ = true;
}

Status NcclGroup::Fail(Status why) {
  Abort();
  broken_ = true;
  return why;
}

Status NcclGroup::Wait(NcclDeadline deadline, const NcclCancel& cancelled, const char* what) {
  if (broken_) return Status::FailedPrecondition("NCCL group is broken");
  cudaSetDevice(device_);
  for (;;) {
    cudaError_t q = cudaStreamQuery(Stream(stream_));
    if (q == cudaSuccess) return Status::OK();
    if (q != cudaErrorNotReady) {
      return Fail(Status::Internal(std::string(what) + ": " + cudaGetErrorString(q)));
    }
    ncclResult_t state;
    ncclResult_t r = ncclCommGetAsyncError(Comm(comm_), &state);
    if (r != ncclSuccess || (state != ncclSuccess && state != ncclInProgress)) {
      return Fail(Status::Unavailable(NcclError(what, r != ncclSuccess ? r : state, Comm(comm_))));
    }
    if (Expired(deadline)) return Fail(Status::DeadlineExceeded(std::string(what) + " missed its deadline"));
    if (cancelled && cancelled()) return Fail(Status::Aborted(std::string(what) + " cancelled"));
    std::this_thread::sleep_for(kPollInterval);
  }
}

Status NcclGroup::Broadcast(void* data, size_t bytes, size_t bucket_bytes, NcclDeadline deadline,
                            const NcclCancel& cancelled) {
  if (broken_) return Status::FailedPrecondition("NCCL group is broken");
  if (bytes == 0) return Status::OK();
  if (data == nullptr) return Status::InvalidArgument("broadcast of a null buffer");
  if (bucket_bytes == 0 || bucket_bytes > bytes) bucket_bytes = bytes;
  cudaSetDevice(device_);
  char* base = static_cast<char*>(data);
  // One NCCL group for all buckets: one launch and, on this non-blocking
  // communicator, one in-progress wait for the lot (per-call waits cost
  // ~0.1 ms each, which small buckets cannot afford).
  ncclResult_t r = ncclGroupStart();
  for (size_t off = 0; r == ncclSuccess && off < bytes; off += bucket_bytes) {
    const size_t len = std::min(bucket_bytes, bytes - off);
    r = ncclBroadcast(base + off, base + off, len, ncclChar, /*root=*/0, Comm(comm_), Stream(stream_));
  }
  ncclResult_t end = ncclGroupEnd();
  if (r == ncclSuccess) r = end;
  // The enqueue may still be in progress (e.g. lazy connection set-up):
  // spin briefly, then poll at the usual interval.
  for (int spins = 0; r == ncclInProgress; ++spins) {
    if (Expired(deadline)) return Fail(Status::DeadlineExceeded("NCCL broadcast enqueue missed its deadline"));
    if (cancelled && cancelled()) return Fail(Status::Aborted("NCCL broadcast cancelled"));
    if (spins < 1000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(kPollInterval);
    }
    ncclResult_t state;
    ncclResult_t e = ncclCommGetAsyncError(Comm(comm_), &state);
    r = e != ncclSuccess ? e : state;
  }
  if (r != ncclSuccess) return Fail(Status::Unavailable(NcclError("ncclBroadcast", r, Comm(comm_))));
  return Wait(deadline, cancelled, "NCCL broadcast");
}

}  // namespace grove::actors
