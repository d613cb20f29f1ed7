// The work item of the CPU shared-prefix attention and the sizes its kernels share: attention.cpp builds and
// runs the items; attention_item.cpp runs them on the vector units, attention_amx.cpp bfloat16 items on AMX tiles.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernel_utils.h"

namespace fastbon::cpu {

constexpr int64_t kChunk = 256;      // keys per item: the chunk's K and V (2 x 64 KiB at D=64) stay in L2
constexpr int64_t kRowBlock = 128;   // query rows per GEMM pass (a multiple of every tile width)
constexpr int64_t kMaxColumns = 64;  // widest register-tile column count (elements); scratch pads to it
static_assert(kRowBlock % kMaxColumns == 0, "a row block pads to whole register tiles");

FASTBON_INLINE int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// One work item: `rows` query rows (scaled, contiguous) against `length` <= kChunk keys/values.
template <typename In, typename Acc>
struct Segment {
  const In* keys;    // [length, head_dim]
  const In* values;  // [length, head_dim]
  int64_t length;
  const Acc* queries;  // [rows, head_dim]
  int64_t rows;
  Acc* out;  // row r's normalised partial output at out + r * out_stride
  int64_t out_stride;
  Acc* lse;  // row r's log-sum-exp at lse[r * lse_stride]
  int64_t lse_stride;
  int64_t first_key;      // keys[0]'s index in its sequence (the prompt's prefix or the sample's suffix)
  const int64_t* starts;  // sliding window: row r sees the keys of index >= starts[r]; nullptr: every key
};

// The first of a segment's keys that row r sees (segment.length when it sees none).
template <typename In, typename Acc>
FASTBON_INLINE int64_t first_visible_key(const Segment<In, Acc>& segment, int64_t r) {
  if (segment.starts == nullptr) return 0;
  const int64_t first = segment.starts[r] - segment.first_key;
  return first < 0 ? 0 : first > segment.length ? segment.length : first;
}

// scores[0, count) = softcap · tanh(scores / softcap) (Gemma 2's attention logit soft-capping).
template <typename Acc>
FASTBON_INLINE void soft_cap(Acc* scores, int64_t count, Acc softcap) {
  for (int64_t index = 0; index < count; ++index) scores[index] = softcap * std::tanh(scores[index] / softcap);
}

// A row that sees no key of its item: zero weight in the merge.
template <typename In, typename Acc>
FASTBON_INLINE void write_empty_row(const Segment<In, Acc>& segment, int64_t r, int64_t head_dim) {
  std::fill(segment.out + r * segment.out_stride, segment.out + r * segment.out_stride + head_dim, Acc(0));
  segment.lse[r * segment.lse_stride] = -std::numeric_limits<Acc>::infinity();
}

template <typename Acc>
int64_t scratch_elements(int64_t head_dim) {
  const int64_t padded_dim = round_up(head_dim, kMaxColumns);
  return kChunk * head_dim + kChunk * padded_dim + head_dim * kRowBlock + kChunk * kRowBlock +
         kRowBlock * padded_dim + 2 * kRowBlock;
}

// An item on the vector units (attention_item.cpp), one function per instruction set (the caller picks by
// active_isa()): queries scaled, softcap 0 = none, scratch of scratch_elements<Acc>(head_dim). Writes each row's
// normalised partial and log-sum-exp.
template <typename In, typename Acc>
FASTBON_TARGET_AVX512 void attend_segment_avx512(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap,
                                                 Acc* scratch);
template <typename In, typename Acc>
FASTBON_TARGET_AVX2 void attend_segment_avx2(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap,
                                             Acc* scratch);
template <typename In, typename Acc>
void attend_segment_baseline(const Segment<In, Acc>& segment, int64_t head_dim, Acc softcap, Acc* scratch);

constexpr int64_t kAmxTileDepth = 32;  // bf16 elements in an AMX tile row: the AMX kernel takes head_dim % 32 == 0

#if FASTBON_X86_DISPATCH
// A bfloat16 item on AMX tiles (attention_amx.cpp). Requires head_dim % kAmxTileDepth == 0 and amx_bf16_active();
// queries unscaled (the scale goes on the scores); scratch of scratch_elements<float>(head_dim).
void attend_segment_amx(const Segment<BFloat16, float>& segment, int64_t head_dim, float scale, float* scratch);
#endif

}  // namespace fastbon::cpu
