// Philox4x32-10 uniforms bit-identical to Triton's tl.rand (docs/spec.md section 2):
// counter (index_lo, index_hi, 0, 0), key (seed, step), first output word (tl.randint),
// folded to a non-negative int32 and scaled by 4.6566127342e-10f.
#pragma once

#include <cstdint>

namespace tcf {

// The four output words of tl.randint4x(key, index), in out[0..3].
inline void philox_words(uint64_t key, uint64_t index, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The first output word, tl.randint(key, index).
inline uint32_t philox_uint32(uint64_t key, uint64_t index) {
  uint32_t words[4];
  philox_words(key, index, words);
  return words[0];
}

// tl.rand(key, index): the word folded to a non-negative int32, scaled into [0, 1).
inline float philox_uniform(uint64_t key, uint64_t index) {
  int32_t x = static_cast<int32_t>(philox_uint32(key, index));
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

}  // namespace tcf
