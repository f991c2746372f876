// Weights between two processes on the same GPU, where NCCL cannot be used
// (one rank per GPU per communicator): the learner exports its device
// buffer as a CUDA IPC handle inside a WeightAnnounce sent over ZeroMQ; the
// rollout worker opens the handle, copies the bytes out and verifies them
// against the announce's checksum. The exporter must keep the buffer
// unchanged until the importer is done (the caller's protocol: a version's
// buffer is immutable while it is announced).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "actors/schema/data.capnp.h"
#include "actors/weight_transfer.h"
#include "base/result.h"

namespace grove::actors {

// The IPC handle bytes of a cudaMalloc'ed allocation on `device`.
Result<std::string> ExportCudaIpcHandle(const void* device_ptr, int device);

// Opens `handle` on `device`, copies `bytes` from its start into host
// memory at `host_dst`, and closes it.
Status CopyFromCudaIpcHandle(const std::string& handle, int device, size_t bytes, void* host_dst);

// The learner: the announce of `snap` (layout, checksum, version) whose
// bytes are the device buffer `device_flat` on `device` (snap.flat may be
// empty; `bytes` is the buffer's size).
Status FillIpcWeightAnnounce(const WeightSnapshot& snap, const void* device_flat, size_t bytes,
                             int device, wire::WeightAnnounce::Builder out);

// The worker: the snapshot an IPC announce names, checked like any other
// received version (limit, layout, checksum). device: where to open the
// handle (this process's index of the GPU; -1: the announce's ipcDevice,
// right when both processes number the GPUs alike).
Result<WeightSnapshot> ReceiveIpcWeights(wire::WeightAnnounce::Reader announce, uint64_t max_bytes, int device = -1);

// The 16 bytes of `device`'s UUID (the same GPU has the same UUID in every
// process, whatever CUDA_VISIBLE_DEVICES numbers it).
Result<std::string> CudaDeviceUuid(int device);

}  // namespace grove::actors
