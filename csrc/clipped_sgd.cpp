// Fused CPU ClippedSGD step (SPEC section 3) over a param group's tensors laid end to end.
//
// Two passes over fixed-size chunks of the flat index space, each parallel with
// at::parallel_for and vectorised with at::vec::Vectorized:
//   1. norms: per-chunk sums of squares and a non-finite flag, in one read of the gradients;
//   2. apply: scales (global, per tensor, or per element with inline Philox draws), weight
//      decay, momentum, nesterov, lr; parameters and momentum written once.
// Between them, on one thread: the reduce (fixed chunk order, so results do not depend on the
// thread count), AutoClip thresholds and the global / per-tensor Philox draws.
// Arithmetic is float32 (float64 for float64 tensors); norms and thresholds are float32.

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "grad_pointers.h"
#include "layout.h"
#include "philox.h"

namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 16384;
// codes of torch_clip_fused.methods.SCOPE_CODES (randomization: 0 none, 1 linear, 2 quadratic)
enum Scope : int64_t { kNone = 0, kGlobal = 1, kLayer = 2, kCoordinate = 3 };

// Chunks per thread at least (256K elements): smaller steps run on the calling thread alone, where
// waking a second thread costs more than it saves (and a busy machine can delay it by milliseconds).
constexpr int64_t kParallelGrain = 16;
using tcf::same_layout;

// Loads and stores of Vectorized<opmath> lanes from a tensor of any supported dtype.
template <typename T>
struct Io {
  using V = Vectorized<at::opmath_type<T>>;
  static V load(const T* p) { return V::loadu(p); }
  static void store(T* p, const V& v) { v.store(p); }
};
template <typename T>
struct ReducedIo {
  using V = Vectorized<float>;
  static V load(const T* p) {
    V out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
  static void store(T* p, const V& v) { at::vec::convert_from_float<T>(v, v).store(p, V::size()); }
};
template <>
struct Io<at::BFloat16> : ReducedIo<at::BFloat16> {};
template <>
struct Io<at::Half> : ReducedIo<at::Half> {};

struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

// Everything the two passes read; filled once per step.
struct Step {
  std::vector<at::Tensor> params, grads, bufs;
  std::vector<int64_t> columns, offsets;
  std::vector<Chunk> chunks;
  std::vector<double> tensor_scale;  // layer scope: per tensor; global: all equal
  std::vector<bool> ready;
  int64_t scope, rand;
  bool update, has_mom, nesterov;
  double sign, inv_scale, level, log2_beta, lr, momentum, dampening, weight_decay;
  uint64_t key;
};

template <typename V>
V where(const V& mask, const V& a, const V& b) {
  return V::blendv(b, a, mask);
}

// Sum of squares of the chunk's clipping source (gradient, or final update direction) and
// whether the gradient holds inf or NaN.
template <typename T>
void norm_chunk(const Step& s, const Chunk& c, double* sumsq, bool* bad) {
  using opmath = at::opmath_type<T>;
  using V = Vectorized<opmath>;
  const T* g = s.grads[c.tensor].data_ptr<T>() + c.start;
  const T* p = s.params[c.tensor].data_ptr<T>() + c.start;
  const T* m = s.has_mom ? s.bufs[c.tensor].data_ptr<T>() + c.start : nullptr;
  const bool ready = s.ready[c.tensor];
  const opmath gs = s.sign * s.inv_scale, wd = s.weight_decay, mu = s.momentum, damp = 1 - s.dampening;
  auto source = [&](auto gv, auto pv, auto mv) {
    if (!s.update) return gv;
    auto d = gv + pv * decltype(gv)(wd);
    if (!s.has_mom) return d;
    auto mn = ready ? mv * decltype(gv)(mu) + d * decltype(gv)(damp) : d;
    return s.nesterov ? d + mn * decltype(gv)(mu) : mn;
  };
  V acc(0), amax(0);
  int64_t i = 0;
  for (; i + V::size() <= c.len; i += V::size()) {
    V gv = Io<T>::load(g + i) * V(gs);
    amax = at::vec::maximum(amax, gv.abs());
    V x = s.update ? source(gv, Io<T>::load(p + i), m ? Io<T>::load(m + i) : V(0)) : gv;
    acc = acc + x * x;
  }
  opmath tail = 0, tail_max = 0;
  for (; i < c.len; ++i) {
    opmath gv = static_cast<opmath>(g[i]) * gs;
    tail_max = std::isnan(gv) ? gv : std::max(tail_max, std::abs(gv));
    opmath x = s.update ? source(gv, static_cast<opmath>(p[i]), m ? static_cast<opmath>(m[i]) : opmath(0)) : gv;
    tail += x * x;
  }
  opmath lanes[V::size()], maxes[V::size()];
  acc.store(lanes);
  amax.store(maxes);
  double total = 0;
  bool nonfinite = !std::isfinite(tail_max);
  for (int64_t k = 0; k < V::size(); ++k) {
    total += lanes[k];
    nonfinite = nonfinite || !std::isfinite(maxes[k]);
  }
  *sumsq = total + tail;
  *bad = nonfinite;
}

template <typename T>
int64_t apply_chunk(const Step& s, const Chunk& c) {
  using opmath = at::opmath_type<T>;
  using V = Vectorized<opmath>;
  T* g = s.grads[c.tensor].data_ptr<T>() + c.start;
  T* p = s.params[c.tensor].data_ptr<T>() + c.start;
  T* m = s.has_mom ? s.bufs[c.tensor].data_ptr<T>() + c.start : nullptr;
  const bool ready = s.ready[c.tensor];
  const opmath gs = s.sign * s.inv_scale, scale = s.tensor_scale[c.tensor], level = s.level;
  const opmath wd = s.weight_decay, mu = s.momentum, damp = 1 - s.dampening, lr = s.lr;
  const bool coordinate = s.scope == kCoordinate;
  const uint64_t flat = s.offsets[c.tensor] + c.start;
  int64_t clipped = 0;

  auto direction = [&](auto d, auto mv, auto* mn_out) {
    using X = decltype(d);
    if (!s.has_mom) return d;
    X mn = ready ? mv * X(mu) + d * X(damp) : d;
    *mn_out = mn;
    return s.nesterov ? d + mn * X(mu) : mn;
  };

  int64_t i = 0;
  if (!(coordinate && s.rand != 0)) {
    V lanes_clipped(0);
    auto clip = [&](const V& x) {
      if (!coordinate) return x * V(scale);
      V above = x.abs() > V(level);
      lanes_clipped = lanes_clipped + (above & V(1));
      return where(above, where(x < V(0), V(-level), V(level)), x);
    };
    for (; i + V::size() <= c.len; i += V::size()) {
      V gv = Io<T>::load(g + i) * V(gs);
      V pv = Io<T>::load(p + i);
      V mv = m ? Io<T>::load(m + i) : V(0);
      V mn = mv;
      V d = s.update ? direction(gv + pv * V(wd), mv, &mn) : direction(clip(gv) + pv * V(wd), mv, &mn);
      if (s.update) d = clip(d);
      Io<T>::store(p + i, pv - d * V(lr));
      if (m) Io<T>::store(m + i, mn);
    }
    opmath counts[V::size()];
    lanes_clipped.store(counts);
    for (int64_t k = 0; k < V::size(); ++k) clipped += static_cast<int64_t>(counts[k]);
  }
  for (; i < c.len; ++i) {
    auto clip = [&](opmath x) -> opmath {
      if (!coordinate) return x * scale;
      const opmath mag = std::abs(x);
      bool hit = mag > level;
      if (hit && s.rand != 0) {
        const float alpha = static_cast<float>(level) / std::max(static_cast<float>(mag), 1.17549435e-38f);
        const float e = s.rand == 1 ? alpha : alpha * alpha;
        hit = tcf::philox_uniform(s.key, flat + i) < std::exp2(e * static_cast<float>(s.log2_beta));
      }
      clipped += hit;
      return hit ? (x < 0 ? -level : level) : x;
    };
    opmath gv = static_cast<opmath>(g[i]) * gs;
    opmath pv = static_cast<opmath>(p[i]);
    opmath mv = m ? static_cast<opmath>(m[i]) : opmath(0);
    opmath mn = mv;
    opmath d = s.update ? direction(gv + pv * wd, mv, &mn) : direction(clip(gv) + pv * wd, mv, &mn);
    if (s.update) d = clip(d);
    p[i] = static_cast<T>(pv - d * lr);
    if (m) m[i] = static_cast<T>(mn);
  }
  return clipped;
}

#define TCF_DISPATCH(dtype, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "clipped_sgd", __VA_ARGS__)

// The ceil(p n)-th smallest of column `col` of a [capacity, columns] history (n = min(count, capacity)).
float nearest_rank(const at::Tensor& history, int64_t col, int64_t count, double p) {
  const int64_t capacity = history.size(0), columns = history.size(1);
  const int64_t n = std::min(count, capacity);
  const float* h = history.data_ptr<float>();
  std::vector<float> values(n);
  for (int64_t r = 0; r < n; ++r) values[r] = h[r * columns + col];
  int64_t k = static_cast<int64_t>(std::ceil(p * static_cast<double>(n)));
  k = std::min(std::max<int64_t>(k, 1), std::max<int64_t>(n, 1));
  std::nth_element(values.begin(), values.begin() + (k - 1), values.end());
  return values[k - 1];
}

}  // namespace

void clipped_sgd_step(
    std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> bufs,
    std::vector<int64_t> columns, std::vector<int64_t> offsets, int64_t seed, at::Tensor step,
    c10::optional<at::Tensor> history, c10::optional<at::Tensor> counts, at::Tensor ready, at::Tensor stats,
    at::Tensor skipped, c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf,
    int64_t scope, bool autoclip, int64_t rand, double level, double beta, double p_autoclip, bool update,
    bool check_finite, bool norms_needed, double lr, double momentum, double dampening, double weight_decay,
    bool nesterov, bool maximize) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "clipped_sgd_step: ", grads.size(), " grads for ", n, " params");
  TORCH_CHECK(ready.scalar_type() == at::kBool, "clipped_sgd_step: ready flags must be bool, got ", ready.scalar_type());
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(params[t].device().is_cpu() && grads[t].device().is_cpu(), "backend='cpp' needs CPU tensors (tensor ", t, ")");
    TORCH_CHECK(params[t].is_non_overlapping_and_dense(), "backend='cpp': parameter ", t, " (strides ",
                params[t].strides(), ") is not dense in memory; make it contiguous or use backend='reference'");
    TORCH_CHECK(same_layout(params[t], grads[t]), "backend='cpp': the gradient of parameter ", t, " has strides ",
                grads[t].strides(), " but the parameter has ", params[t].strides(),
                "; give them the same memory layout or use backend='reference'");
    TORCH_CHECK(bufs.empty() || same_layout(params[t], bufs[t]), "backend='cpp': the momentum buffer of parameter ",
                t, " has strides ", bufs[t].strides(), " but the parameter has ", params[t].strides());
    TORCH_CHECK(params[t].scalar_type() == grads[t].scalar_type(), "backend='cpp': tensor ", t, " has a ",
                params[t].scalar_type(), " parameter and a ", grads[t].scalar_type(), " gradient");
  }
  Step s;
  s.params = params;
  s.grads = grads;
  s.bufs = bufs;
  s.columns = columns;
  s.offsets = offsets;
  s.scope = scope;
  s.rand = rand;
  s.update = update;
  s.has_mom = momentum != 0;
  s.nesterov = nesterov;
  s.sign = maximize ? -1.0 : 1.0;
  s.inv_scale = grad_scale.has_value() ? 1.0 / static_cast<double>(grad_scale->item<float>()) : 1.0;
  s.level = level;
  s.log2_beta = static_cast<float>(std::log2(beta));  // as float(math.log2(beta)) in Python
  s.lr = lr;
  s.momentum = momentum;
  s.dampening = dampening;
  s.weight_decay = weight_decay;
  int64_t* step_ptr = step.data_ptr<int64_t>();
  s.key = (static_cast<uint64_t>(*step_ptr) << 32) | static_cast<uint64_t>(seed);
  bool* ready_ptr = ready.data_ptr<bool>();
  s.ready.resize(n);
  for (int64_t t = 0; t < n; ++t) s.ready[t] = ready_ptr[columns[t]];
  std::vector<int64_t> first_chunk(n + 1);
  for (int64_t t = 0; t < n; ++t) {
    first_chunk[t] = static_cast<int64_t>(s.chunks.size());
    const int64_t numel = params[t].numel();
    for (int64_t start = 0; start < numel; start += kChunk) s.chunks.push_back({t, start, std::min(kChunk, numel - start)});
  }
  first_chunk[n] = static_cast<int64_t>(s.chunks.size());
  const int64_t n_chunks = first_chunk[n];

  // pass 1: norms
  std::vector<double> partial(n_chunks, 0.0);
  std::vector<char> bad(n_chunks, 0);
  if (norms_needed) {
    at::parallel_for(0, n_chunks, kParallelGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const Chunk& c = s.chunks[k];
        bool b = false;
        TCF_DISPATCH(params[c.tensor].scalar_type(), [&] { norm_chunk<scalar_t>(s, c, &partial[k], &b); });
        bad[k] = b;
      }
    });
  }
  // reduce, in chunk order
  std::vector<float> tensor_norm(n, 0.f);
  double total_sq = 0;
  bool any_bad = false;
  for (int64_t t = 0; t < n; ++t) {
    double sq = 0;
    for (int64_t k = first_chunk[t]; k < first_chunk[t + 1]; ++k) {
      sq += partial[k];
      any_bad = any_bad || bad[k];
    }
    tensor_norm[t] = static_cast<float>(std::sqrt(sq));
    total_sq += sq;
  }
  const float total = norms_needed ? static_cast<float>(std::sqrt(total_sq)) : NAN;
  bool ok = !(check_finite && any_bad);
  if (found_inf.has_value()) ok = ok && found_inf->item<float>() == 0.f;

  // thresholds and scales
  float* st = stats.data_ptr<float>();
  st[0] = total;
  s.tensor_scale.assign(n, 1.0);
  if (scope == kGlobal || scope == kLayer) {
    const bool layer = scope == kLayer;
    const int64_t groups = layer ? n : 1;
    double eta_sum = 0, clip_sum = 0;
    for (int64_t j = 0; j < groups; ++j) {
      const float norm = layer ? tensor_norm[j] : total;
      const int64_t col = layer ? columns[j] : 0;
      float eta = static_cast<float>(level);
      if (autoclip) {
        float* h = history->data_ptr<float>();
        int64_t* count = counts->data_ptr<int64_t>() + col;
        const int64_t capacity = history->size(0), n_cols = history->size(1);
        if (ok && std::isfinite(norm)) {
          h[(*count % capacity) * n_cols + col] = norm;
          *count += 1;
        }
        eta = *count > 0 ? nearest_rank(*history, col, *count, p_autoclip) : norm;
      }
      const float alpha = eta / std::max(norm, 1.17549435e-38f);
      bool clip = norm > eta;
      if (clip && rand != 0) {
        const float e = rand == 1 ? alpha : alpha * alpha;
        clip = tcf::philox_uniform(s.key, layer ? col : 0) < std::exp2(e * static_cast<float>(s.log2_beta));
      }
      const double scale = clip ? alpha : 1.0;
      if (layer) {
        s.tensor_scale[j] = scale;
      } else {
        s.tensor_scale.assign(n, scale);
      }
      eta_sum += eta;
      clip_sum += clip;
    }
    st[1] = static_cast<float>(eta_sum / groups);
    st[2] = static_cast<float>(clip_sum / groups);
  } else if (scope == kCoordinate) {
    st[1] = static_cast<float>(level);
  } else {
    st[1] = INFINITY;
    st[2] = 0.f;
  }

  // pass 2: apply
  if (ok) {
    std::vector<int64_t> clipped(n_chunks, 0);
    at::parallel_for(0, n_chunks, kParallelGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const Chunk& c = s.chunks[k];
        TCF_DISPATCH(params[c.tensor].scalar_type(), [&] { clipped[k] = apply_chunk<scalar_t>(s, c); });
      }
    });
    if (scope == kCoordinate) {
      int64_t hits = 0, numel = 0;
      for (int64_t k = 0; k < n_chunks; ++k) hits += clipped[k];
      for (int64_t t = 0; t < n; ++t) numel += params[t].numel();
      st[2] = static_cast<float>(static_cast<double>(hits) / std::max<int64_t>(numel, 1));
    }
    if (s.has_mom)
      for (int64_t t = 0; t < n; ++t) ready_ptr[columns[t]] = true;
  } else {
    st[2] = 0.f;  // a skipped step clips nothing
  }
  st[3] = ok ? 0.f : 1.f;
  *skipped.data_ptr<int64_t>() += ok ? 0 : 1;
  *step_ptr += 1;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("clipped_sgd_step", &clipped_sgd_step, "One fused ClippedSGD step of one param group (CPU)");
  m.def("refresh_grad_pointers", &refresh_grad_pointers,
        "Re-read a param group's gradient pointers for a cached plan; -1/-2 (unchanged/changed) or the bad index");
  m.def("philox_uniform", [](uint64_t key, uint64_t index) { return tcf::philox_uniform(key, index); },
        "tl.rand(key, index), for tests");
}
