// Test-only launchers for kernels that exercise single PTX wrappers of
// kernels/ptx/ (the ones no production kernel uses yet, and the layouts the
// others rely on). Plain host types so the GoogleTest file stays C++20 host
// code; each returns the CUDA error of its launch and copies.
#pragma once

#include <cstdint>
#include <vector>

namespace grove::kernels::testing {

// ldmatrix .x{1,2,4} (trans or not) from a 32 x 8 bf16 matrix whose element
// (r, c) is r * 8 + c; lane l gives the address of row l. Returns per lane
// and register the two bf16 halves as floats: out[(lane * 4 + reg) * 2 + half].
int RunLdmatrix(int matrices, bool trans, std::vector<float>* out);

// stmatrix .x{1,2,4} (trans or not): lane l's register i holds halves with
// codes (i * 32 + l) * 2 + h; lane l gives the address of row l of a 32 x 8
// bf16 matrix (poisoned with -1 first). Returns that matrix, row-major.
int RunStmatrix(int matrices, bool trans, std::vector<float>* out);

// One mma.sync m16n8k16: a [16][16] row-major, b [8][16] ([n][k]), c [16][8];
// fragments are loaded straight from global memory by the documented layout.
int RunMma(const std::vector<float>& a, const std::vector<float>& b, std::vector<float>* c);

// 64 threads each copy one 16-byte chunk of `src` (1024 bytes) into shared
// memory with cp.async: chunk t by .ca if t % 3 == 0, .cg if t % 3 == 1, and
// .cg with src-size t % 17 (zero fill) if t % 3 == 2; then wait_group 0 and
// copy shared memory back out.
int RunCpAsync(const std::vector<uint8_t>& src, std::vector<uint8_t>* out);

// kernels/quant_unpack.h's device recipes (lop3 / hsub2 / prmt) on each word:
// int4_out[8 * i + c] = column c of words[i] as int4, int8_out[4 * i + c] =
// byte c of words[i] as int8.
int RunQuantUnpack(const std::vector<uint32_t>& words, std::vector<float>* int4_out, std::vector<float>* int8_out);

// sm_90a only: one warpgroup's wgmma m64n128k16 with both operands
// MN-major (wgmma_m64n128k16_f32_bf16_ss_mn, make_wgmma_desc_mn_sw128), two
// k steps: c [64][128] = a^T b with a [32 k][64 m], b [32 k][128 n].
int RunWgmmaMn(const std::vector<float>& a, const std::vector<float>& b, std::vector<float>* c);

}  // namespace grove::kernels::testing
