// What the CUDA kernels of contrastive.cu and structure.cu share (the CUDA twin of
// mmkd_kernels/triton/tiles.py): a 64×64 similarity tile of raw dot products in shared memory,
// and 64×64 output accumulators (one per output chunk, up to kWideChunks side by side) that a
// kernel grows by (64×64 operand tile) · (64 rows of X).
//
// Tiles: 256 threads (8 warps) per block; a tile is kBlock = 64 rows × 64 columns; D is read in
// kChunk = 32 wide chunks, masked at its tail; an output D chunk is kBlock = 64 wide.
// Arithmetic: float32 inputs use plain FMA (exact float32 products and sums, no TF32); float16 and
// bfloat16 inputs use tensor cores through WMMA fragments with float32 accumulators: their
// similarity tiles 16×16×16 in the input dtype; their gradient products (dz, dG)·X in bfloat16 for
// bfloat16 (16×16×16) and in TF32 for float16 (16×16×8: float16's range would lose weights as small
// as e^{−2|scale|}; Traits<T>::Operand), as the Triton kernels do (tiles.accumulate_chunk).
//
// Tests run these kernels on the CPU through emulation/cuda_emulation.h (MMKD_CPU_EMULATION: the
// two hooks below, dynamic_smem and launch); nvcc builds never see it.
//
// Conventions: every function here is called by all threads of the block (it holds barriers);
// shared buffers come from the kernel's dynamic shared memory, 128-byte aligned (WMMA needs 32);
// global offsets are int64 (N up to 256K rows and any strides), shared ones int.
//
// Validation: compiled with nvcc -arch=sm_90 and run on the CPU under emulation/; a run on a GPU is
// still owed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include <cstddef>
#include <type_traits>

#include "launchers.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "mmkd CUDA kernels need sm_80 or newer (bfloat16 WMMA); build with TORCH_CUDA_ARCH_LIST >= 8.0"
#endif

namespace mmkd_tiles {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBlock = 64;            // rows and columns of a tile; width of an output D chunk
constexpr int kChunk = 32;            // D chunk of the similarity dot products
constexpr int kTilePitch = kBlock + 4;  // floats per row of a float tile (WMMA store: multiple of 4)
constexpr int kRowsPerWarp = kBlock / kWarps;  // row-wise epilogues: warp w owns 8 rows

static_assert(kThreads == 256 && kBlock == 64, "the FMA and WMMA thread mappings assume 256 threads and 64×64 tiles");
static_assert(kChunk % 16 == 0, "WMMA steps of 16 along D");

// Per input dtype T: the padded pitches (in elements) of the shared buffers, and the operand type of
// the gradient products P·X (P = dz or dG, X an input tile). float16's range ends at 6e-8, and late
// in distillation a softmax's weights off the target are about e^{−scale} (1e-9 at scale 20): in
// float16 they vanished (the emulated gradient was 9e-2 off at D = 384). So for float16 inputs P and
// X enter the product as TF32 (float32's range, float16's 10-bit mantissa; WMMA 16×16×8), at half
// the rate of float16's tensor cores. bfloat16 has float32's range.
template <typename T>
struct Traits;

template <>
struct Traits<float> {
  using Operand = float;
  static constexpr int kStagePitch = kChunk + 1;    // odd: conflict-free reads down a column
  static constexpr int kOperandPitch = kBlock + 4;  // P (dz or dG) and X tiles
  __device__ static float from_float(float x) { return x; }
  __device__ static float to_float(float x) { return x; }
  __device__ static Operand to_operand(float x) { return x; }
};

template <>
struct Traits<__half> {
  using Operand = float;  // TF32 values
  using Precision = nvcuda::wmma::precision::tf32;
  static constexpr int kProductK = 8;
  static constexpr int kStagePitch = kChunk + 8;    // WMMA: a multiple of 8 halves (16 bytes)
  static constexpr int kOperandPitch = kBlock + 4;  // WMMA: a multiple of 4 floats
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static Operand to_operand(float x) { return nvcuda::wmma::__float_to_tf32(x); }
};

template <>
struct Traits<__nv_bfloat16> {
  using Operand = __nv_bfloat16;
  using Precision = __nv_bfloat16;
  static constexpr int kProductK = 16;
  static constexpr int kStagePitch = kChunk + 8;
  static constexpr int kOperandPitch = kBlock + 8;
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static Operand to_operand(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
using Operand = typename Traits<T>::Operand;

template <typename T>
constexpr bool kIsFloat = std::is_same<T, float>::value;

// Shared-memory sizes in bytes, each rounded up to 128 so that consecutive buffers stay aligned.
constexpr size_t round_up(size_t bytes) { return (bytes + 127) / 128 * 128; }
constexpr size_t kTileBytes = round_up(sizeof(float) * kBlock * kTilePitch);  // 17 408
template <typename T>
constexpr size_t kStageBytes = round_up(sizeof(T) * 2 * kBlock * Traits<T>::kStagePitch);  // A and B chunks
template <typename T>
constexpr size_t kOperandBytes = round_up(sizeof(Operand<T>) * kBlock * Traits<T>::kOperandPitch);
// The stage (A, B chunks of dot_tile) and the X tile of accumulate_px are never live together:
// dot_tile ends with a barrier before any X load, and a kernel's loop begins with one before the
// next dot_tile. Kernels give them one region of this size.
template <typename T>
constexpr size_t kStageOrOperandBytes = kStageBytes<T> > kOperandBytes<T> ? kStageBytes<T> : kOperandBytes<T>;

static_assert(kTileBytes % 128 == 0, "buffers stay 128-byte aligned");
// Every kernel's dynamic shared memory must fit the opt-in limit of every sm_80+ GPU (99 KiB on
// sm_86/sm_89; 163 KiB on sm_80, 227 KiB on sm_90).
constexpr size_t kMaxSharedBytes = 96 * 1024;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // the butterfly gives every lane the same bits (a + b == b + a in IEEE)
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;  // fmaxf drops NaN: callers keep NaN alive through their sums of exp(z − max)
}

// x as a D: itself, or (D = Operand<T> ≠ T) converted through float.
template <typename T, typename D>
__device__ __forceinline__ D convert(T x) {
  if constexpr (std::is_same<T, D>::value) {
    return x;
  } else {
    return Traits<T>::to_operand(Traits<T>::to_float(x));
  }
}

// dst[r][c] = X[first + r, col0 + c] for r < kBlock, c < WIDTH, 0 where first + r >= end or
// col0 + c >= cols, as D (T, or Operand<T>). Consecutive threads read consecutive columns
// (coalesced when the column stride is 1). No barrier.
template <typename T, int WIDTH, typename D = T>
__device__ __forceinline__ void load_rows(const T* __restrict__ X, int64_t first, int64_t end, int64_t row_stride,
                                          int64_t col_stride, int64_t col0, int64_t cols, D* dst, int pitch) {
  const D zero = convert<T, D>(Traits<T>::from_float(0.0f));
#pragma unroll 4
  for (int e = threadIdx.x; e < kBlock * WIDTH; e += kThreads) {
    const int r = e / WIDTH;
    const int c = e % WIDTH;
    const int64_t row = first + r;
    const int64_t col = col0 + c;
    dst[r * pitch + c] = (row < end && col < cols) ? convert<T, D>(X[row * row_stride + col * col_stride]) : zero;
  }
}

// Z[i][j] = Σ_d A[a_first + i, d] · B[b_first + j, d] (float32) for i, j < kBlock, over all d < D;
// 0 where a_first + i >= a_end or b_first + j >= b_end (also when D = 0). Z has pitch kTilePitch;
// stage holds kStageBytes<T>. The caller has passed a barrier since the last reads of Z and stage;
// this ends with one, after which Z (and whatever the caller wrote to shared memory before the
// call) is visible to all threads.
template <typename T>
__device__ void dot_tile(const T* __restrict__ A, int64_t a_first, int64_t a_end, int64_t a_row, int64_t a_col,
                         const T* __restrict__ B, int64_t b_first, int64_t b_end, int64_t b_row, int64_t b_col,
                         int64_t d, T* stage, float* Z) {
  constexpr int P = Traits<T>::kStagePitch;
  T* As = stage;
  T* Bs = stage + kBlock * P;
  if constexpr (kIsFloat<T>) {
    // Thread (ty, tx) owns rows ty + 16·i and columns tx + 16·j, i, j < 4.
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int64_t d0 = 0; d0 < d; d0 += kChunk) {
      if (d0 > 0) __syncthreads();  // every thread is done with the previous chunk
      load_rows<T, kChunk>(A, a_first, a_end, a_row, a_col, d0, d, As, P);
      load_rows<T, kChunk>(B, b_first, b_end, b_row, b_col, d0, d, Bs, P);
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[(ty + 16 * i) * P + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[(tx + 16 * j) * P + k];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Z[(ty + 16 * i) * kTilePitch + tx + 16 * j] = acc[i][j];
  } else {
    // Warp w owns the 16×16 fragments (w / 2, 2·(w % 2) + x), x < 2, of the 4×4 fragment grid.
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2;
    const int fc = (warp % 2) * 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int64_t d0 = 0; d0 < d; d0 += kChunk) {
      if (d0 > 0) __syncthreads();
      load_rows<T, kChunk>(A, a_first, a_end, a_row, a_col, d0, d, As, P);
      load_rows<T, kChunk>(B, b_first, b_end, b_row, b_col, d0, d, Bs, P);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kChunk; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, As + fr * 16 * P + k, P);
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          // B chunk rows are the columns of the product: element (k, n) at Bs[n·P + k].
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, Bs + (fc + x) * 16 * P + k, P);
          wmma::mma_sync(acc[x], fa, fb, acc[x]);
        }
      }
    }
#pragma unroll
    for (int x = 0; x < 2; ++x)
      wmma::store_matrix_sync(Z + fr * 16 * kTilePitch + (fc + x) * 16, acc[x], kTilePitch, wmma::mem_row_major);
  }
  __syncthreads();
}

// A thread's share of a kBlock × kBlock float32 output accumulator.
template <typename T, bool IS_FLOAT = kIsFloat<T>>
struct OutAcc;

template <typename T>
struct OutAcc<T, true> {
  float v[4][4];  // rows ty + 16·i, columns tx + 16·j, as in dot_tile
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) v[i][j] = 0.0f;
  }
};

template <typename T>
struct OutAcc<T, false> {
  // fragments placed as in dot_tile's, of the product's shape (16×16×8 for TF32)
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, Traits<T>::kProductK, float> f[2];
  __device__ void zero() {
    nvcuda::wmma::fill_fragment(f[0], 0.0f);
    nvcuda::wmma::fill_fragment(f[1], 0.0f);
  }
};

// acc += Pm · X[x_first .. x_first + kBlock, do0 .. do0 + kBlock] where Pm is the kBlock × kBlock
// operand tile in shared memory (pitch Traits<T>::kOperandPitch, type Operand<T>, written with
// Traits<T>::to_operand) and rows x_first + k >= x_end or columns >= dx of X count as 0. Xs is a
// kOperandBytes<T> buffer (it may alias dot_tile's stage). The caller wrote Pm since its last
// barrier and has passed a barrier since the last reads of Xs; the barrier here makes both visible.
// The next writes of Pm or Xs need a barrier first.
template <typename T>
__device__ void accumulate_px(const Operand<T>* Pm, const T* __restrict__ X, int64_t x_first, int64_t x_end,
                              int64_t x_row, int64_t x_col, int64_t do0, int64_t dx, Operand<T>* Xs, OutAcc<T>& acc) {
  constexpr int P = Traits<T>::kOperandPitch;
  load_rows<T, kBlock, Operand<T>>(X, x_first, x_end, x_row, x_col, do0, dx, Xs, P);
  __syncthreads();
  if constexpr (kIsFloat<T>) {
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
#pragma unroll 8
    for (int k = 0; k < kBlock; ++k) {
      float p[4], x[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) p[i] = Pm[(ty + 16 * i) * P + k];
#pragma unroll
      for (int j = 0; j < 4; ++j) x[j] = Xs[k * P + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc.v[i][j] = fmaf(p[i], x[j], acc.v[i][j]);
    }
  } else {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2;
    const int fc = (warp % 2) * 2;
    constexpr int K = Traits<T>::kProductK;
    using Precision = typename Traits<T>::Precision;
#pragma unroll
    for (int k = 0; k < kBlock; k += K) {
      wmma::fragment<wmma::matrix_a, 16, 16, K, Precision, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, Pm + fr * 16 * P + k, P);
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        wmma::fragment<wmma::matrix_b, 16, 16, K, Precision, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, Xs + k * P + (fc + x) * 16, P);
        wmma::mma_sync(acc.f[x], fa, fb, acc.f[x]);
      }
    }
  }
}

// The value a gradient kernel stores is its accumulator's, unless it gives store_out an epilogue.
struct StoreAsIs {
  __device__ float operator()(int /*i*/, int64_t /*col*/, float v) const { return v; }
};

// out[(out_first + i) · dx + do0 + j] = epilogue(i, do0 + j, acc[i][j]) for out_first + i < out_end
// and do0 + j < dx (out is row-major with row length dx). scratch is a kTileBytes buffer that no
// thread reads any more (the WMMA path stages its fragments there); the caller has passed a barrier
// since its last reads.
template <typename T, typename Epilogue = StoreAsIs>
__device__ void store_out(const OutAcc<T>& acc, float* __restrict__ out, int64_t out_first, int64_t out_end,
                          int64_t do0, int64_t dx, float* scratch, Epilogue epilogue = Epilogue{}) {
  if constexpr (kIsFloat<T>) {
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = out_first + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = do0 + tx + 16 * j;
        if (row < out_end && col < dx) out[row * dx + col] = epilogue(ty + 16 * i, col, acc.v[i][j]);
      }
    }
  } else {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2;
    const int fc = (warp % 2) * 2;
#pragma unroll
    for (int x = 0; x < 2; ++x)
      wmma::store_matrix_sync(scratch + fr * 16 * kTilePitch + (fc + x) * 16, acc.f[x], kTilePitch,
                              wmma::mem_row_major);
    __syncthreads();
#pragma unroll 4
    for (int e = threadIdx.x; e < kBlock * kBlock; e += kThreads) {
      const int i = e / kBlock;
      const int j = e % kBlock;
      const int64_t row = out_first + i;
      const int64_t col = do0 + j;
      if (row < out_end && col < dx) out[row * dx + col] = epilogue(i, col, scratch[i * kTilePitch + j]);
    }
  }
}

// The launchers' dtype codes (launchers.h mmkd_dtype): whether `dtype` is one, and
// with_dtype(dtype, f), which calls f(Type<T>{}) with T the element type of that code (the caller
// checked it) and returns what f returns: one switch for every launcher's template instances.
template <typename T>
struct Type {
  using type = T;
};

inline bool valid_dtype(int dtype) { return dtype == MMKD_FLOAT32 || dtype == MMKD_FLOAT16 || dtype == MMKD_BFLOAT16; }

template <typename F>
int with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case MMKD_FLOAT32:
      return f(Type<float>{});
    case MMKD_FLOAT16:
      return f(Type<__half>{});
    case MMKD_BFLOAT16:
      return f(Type<__nv_bfloat16>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// Blocks of kBlock covering n (n > 0), or 0 when they would not fit a grid dimension (limit).
inline unsigned int blocks_of(int64_t n, int64_t limit) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  return blocks <= limit ? static_cast<unsigned int>(blocks) : 0u;
}

// Output chunks held side by side: a gradient block accumulates CHUNKS kBlock-wide chunks of the
// output's D at once, so that each similarity tile is computed once per kBlock · CHUNKS output
// columns instead of once per kBlock (at D = 384, once instead of six times). Two widths are built:
// kNarrowChunks for D ≤ 128 and kWideChunks above (D = 384 in one block, D = 768 in two); chunks
// that start at or past D are skipped at run time. Registers: 16 floats of accumulator per chunk
// and thread.
constexpr int kNarrowChunks = 2;
constexpr int kWideChunks = 6;

inline int output_chunks(int64_t d) { return d <= kNarrowChunks * kBlock ? kNarrowChunks : kWideChunks; }

// Blocks of kBlock · chunks output columns covering d (d > 0), or 0 above a grid's y limit.
inline unsigned int output_groups(int64_t d, int chunks) {
  const int64_t width = static_cast<int64_t>(kBlock) * chunks;
  const int64_t groups = (d + width - 1) / width;
  return groups <= 65535 ? static_cast<unsigned int>(groups) : 0u;
}

// The grid of a gradient kernel: blocks of kBlock rows × groups of CHUNKS output chunks covering
// d (rows, d > 0). False where it would not fit the grid's limits.
inline bool gradient_grid(int64_t rows, int64_t d, int chunks, dim3* grid) {
  const unsigned int row_blocks = blocks_of(rows, 0x7fffffff);
  const unsigned int d_groups = output_groups(d, chunks);
  *grid = dim3(row_blocks, d_groups);
  return row_blocks != 0 && d_groups != 0;
}

// f(std::integral_constant<int, CHUNKS>) for the output width d: launchers pick the kernel instance
// with `with_output_chunks(d, [&](auto chunks) { ... kernel<T, decltype(chunks)::value> ... })`.
template <typename F>
int with_output_chunks(int64_t d, F f) {
  if (output_chunks(d) == kNarrowChunks) return f(std::integral_constant<int, kNarrowChunks>{});
  return f(std::integral_constant<int, kWideChunks>{});
}

template <typename T, int CHUNKS>
struct OutAccs {
  OutAcc<T> chunk[CHUNKS];
  __device__ void zero() {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) chunk[c].zero();
  }
};

// accs.chunk[c] += Pm · X[x_first .., do_first + c · kBlock ..] for each chunk that starts before
// dx: accumulate_px, chunk after chunk, with its contract, and a barrier between chunks (each
// reloads Xs).
template <typename T, int CHUNKS>
__device__ void accumulate_px_chunks(const Operand<T>* Pm, const T* __restrict__ X, int64_t x_first, int64_t x_end,
                                     int64_t x_row, int64_t x_col, int64_t do_first, int64_t dx, Operand<T>* Xs,
                                     OutAccs<T, CHUNKS>& accs) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t do0 = do_first + static_cast<int64_t>(c) * kBlock;
    if (do0 < dx) {  // uniform over the block
      if (c > 0) __syncthreads();  // every thread is done reading the previous chunk's X tile
      accumulate_px<T>(Pm, X, x_first, x_end, x_row, x_col, do0, dx, Xs, accs.chunk[c]);
    }
  }
}

// store_out of each chunk that starts before dx (same contract), a barrier between chunks (each
// stages its fragments in scratch).
template <typename T, int CHUNKS, typename Epilogue = StoreAsIs>
__device__ void store_out_chunks(const OutAccs<T, CHUNKS>& accs, float* __restrict__ out, int64_t out_first,
                                 int64_t out_end, int64_t do_first, int64_t dx, float* scratch,
                                 Epilogue epilogue = Epilogue{}) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t do0 = do_first + static_cast<int64_t>(c) * kBlock;
    if (do0 < dx) {
      if (c > 0) __syncthreads();  // every thread is done reading the previous chunk's staging
      store_out<T>(accs.chunk[c], out, out_first, out_end, do0, dx, scratch, epilogue);
    }
  }
}

// The block's dynamic shared memory (128-byte aligned; kernels carve their buffers from it).
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef MMKD_CPU_EMULATION
  return mmkd_emulation::shared_memory();
#else
  extern __shared__ __align__(128) unsigned char mmkd_smem[];
  return mmkd_smem;
#endif
}

// Launch with `bytes` of dynamic shared memory, opting in above the default 48 KB.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, size_t bytes, cudaStream_t stream, Args... args) {
#ifdef MMKD_CPU_EMULATION
  (void)stream;
  return mmkd_emulation::launch(kernel, grid, kThreads, bytes, args...);
#else
  if (bytes > 48 * 1024) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (error != cudaSuccess) return error;
  }
  kernel<<<grid, kThreads, bytes, stream>>>(args...);
  return cudaGetLastError();
#endif
}


}  // namespace mmkd_tiles
