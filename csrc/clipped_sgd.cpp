// Fused CPU ClippedSGD / ClippedAdamW step (docs/spec.md section 3) over a param group's tensors
// laid end to end.
//
// Two passes over fixed-size chunks of the flat index space, each parallel with
// at::parallel_for and vectorised with at::vec::Vectorized:
//   1. norms: per-chunk sums of squares and a non-finite flag, in one read of the gradients (unit
//      scope: per unit piece of each chunk, csrc/unit_norms.h; the relative threshold also reads
//      the parameters);
//   2. apply: scales (global, per tensor, per unit, or per element with inline Philox draws), then
//      the SGD rule (weight decay, momentum, nesterov, lr; parameters and momentum written once) or
//      AdamW's (csrc/adamw_update.h; parameters and moments read and written once).
// Between them, on one thread: the reduce (fixed chunk order, so results do not depend on the
// thread count), the thresholds and the global / per-tensor / per-unit Philox draws.
// Every threshold policy's state comes in one generic container (threshold_state / threshold_count /
// threshold_sorted: torch_clip_fused.thresholds.policy.ThresholdState) and its settings as
// ClipOptions.params (the policy's kernel_params); csrc/<policy>.h reads them.
// norm_type (torch_clip_fused/norm_type.py; ClipOptions.norm_kind, norm_p): pass 1 sums |x|^p in double, or
// takes max |x|, per chunk instead (norm_part_chunk), combined by sum or max; the 2-norm path is unchanged.
// Arithmetic is float32 (float64 for float64 tensors); norms and thresholds are float32.  Sums of
// squares are double: float32 lanes per chunk, summed again with double squares where float32's
// squares underflow or overflow (sum_again_in_double), so that a norm is right at both ends of the
// float32 range; a norm past float32's range (+inf as float32) takes its scale from the double sum.
// Given norms (a sharded group's, reduced across ranks: norms_given) skip pass 1; unit scope and the
// relative threshold then also take given_sums, the units' and weights' sums of squares reduced across the
// ranks that split them (torch_clip_fused/distributed/units.py).

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <type_traits>
#include <vector>

#include "autoclip_history.h"
#include "zscore_threshold.h"
#include "adagc_threshold.h"
#include "adamw_update.h"
#include "grad_pointers.h"
#include "layout.h"
#include "philox.h"
#include "unit_norms.h"

namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 16384;
// codes of torch_clip_fused.methods: SCOPE_CODES, THRESHOLD_CODES, RANDOMIZATION_CODES, UPDATE_CODES
enum Scope : int64_t { kNone = 0, kGlobal = 1, kLayer = 2, kCoordinate = 3, kUnit = 4 };
enum Threshold : int64_t { kConstant = 0, kAuto = 1, kZscore = 2, kEmaRelative = 3, kRelative = 4 };
constexpr double kZclipEps = 1e-6;  // ZClip's eps in the z-score (torch_clip_fused.config.ZCLIP_EPS)
constexpr double kAdagcEps = 1e-8;  // AdaGC's eps (torch_clip_fused.config.ADAGC_EPS)
enum Rand : int64_t { kNoRand = 0, kLinear = 1, kQuadratic = 2 };
enum Rule : int64_t { kClipOnly = 0, kSgd = 1, kAdamW = 2 };
// the norm type (torch_clip_fused/norm_type.py): the 2-norm, inf (max |x|), or any p >= 1 (ClipOptions.norm_p)
enum NormKind : int64_t { kNormTwo = 0, kNormInf = 1, kNormPower = 2 };

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

}  // namespace

// What to clip and how (torch_clip_fused.config.ClipConfig, as codes), and the non-finite policy.
struct ClipOptions {
  int64_t scope = kNone, threshold = kConstant, randomization = kNoRand;
  double level = 1.0, beta = 0.5;
  // the threshold policy's kernel_params (torch_clip_fused/thresholds/): auto (p,); zscore (alpha, 1 - alpha,
  // z, clip-value code, clip_factor, skip_update_on_spike); ema_relative (lambda, 1 - beta, warm-up);
  // relative (eps,); constant ()
  std::vector<double> params;
  bool clip_update = false;  // clip_point="update": scales taken from the final update direction
  bool check_finite = true;  // a non-finite gradient makes the step skip
  bool norms_needed = true;  // whether the norm pass runs at all
  bool norms_given = false;  // the norms are read from `norms` instead of computed (pass 1 skipped)
  bool apply = true;         // false: stage norms only (the functional API's first half)
  int64_t norm_kind = kNormTwo;  // NormKind: what pass 1 sums per chunk (norm_parts below)
  double norm_p = 2.0;           // p of kNormPower
};

// The update rule after clipping (torch_clip_fused.config.SGDUpdate, AdamWUpdate).
struct UpdateOptions {
  int64_t rule = kSgd;
  double lr = 0.0, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false, maximize = false;
  bool stochastic_rounding = false;  // bfloat16 / float16 p and m rounded stochastically (docs/spec.md 3.1)
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // AdamW
  bool amsgrad = false;
};

namespace {

// A threshold policy's state (torch_clip_fused.thresholds.policy.ThresholdState): values [rows, columns] in
// the group's norm arithmetic, counts int64 [columns] and, for AutoClip, sorted_values [columns, rows].
struct ThresholdState {
  c10::optional<at::Tensor> values, counts, sorted_values;
};

// Everything the step reads; filled once per step.
struct Step {
  std::vector<at::Tensor> params, grads, first_moments;  // first moments: momentum (SGD) or exp_avg (AdamW)
  std::vector<at::Tensor> exp_avg_sqs, max_exp_avg_sqs;  // AdamW
  std::vector<tcf::AdamConsts<float>> adam32;   // AdamW: per tensor, for float32 arithmetic
  std::vector<tcf::AdamConsts<double>> adam64;  // and for float64 tensors
  std::vector<int64_t> columns, offsets;
  // a shard that is not one row-major range of its parameter (GroupTensors.index_rows): the Philox index of
  // its element l is offsets[t] + l + (l / index_inner[t]) * index_extra[t]; both empty where every extra is 0
  std::vector<int64_t> index_inner, index_extra;
  std::vector<Chunk> chunks;
  std::vector<double> tensor_scale;  // layer scope: per tensor; global: all equal
  // unit scope: per tensor, elements per unit and the index of its first unit in unit_scale
  std::vector<int64_t> unit_len, unit_base;
  std::vector<double> unit_scale;
  std::vector<bool> ready;
  ClipOptions clip;
  ThresholdState threshold;
  UpdateOptions sgd;
  bool has_mom;
  double sign, inv_scale, log2_beta;
  uint64_t key;
};

// The SGD constants of a step in the arithmetic type T, read once per chunk rather than per
// element (the loops store through pointers the compiler cannot tell apart from the Step).
template <typename T>
struct SgdConsts {
  T wd, mu, damp;
  bool has_wd, has_mom, nesterov;
  explicit SgdConsts(const Step& s)
      : wd(static_cast<T>(s.sgd.weight_decay)), mu(static_cast<T>(s.sgd.momentum)),
        damp(static_cast<T>(1 - s.sgd.dampening)), has_wd(s.sgd.weight_decay != 0), has_mom(s.has_mom),
        nesterov(s.sgd.nesterov) {}
};

// d = g + wd p; with wd = 0 exactly g (an infinite parameter must not turn 0 * inf into NaN).
template <typename X, typename T>
X with_decay(const SgdConsts<T>& k, X g, X p) {
  return k.has_wd ? g + p * X(k.wd) : g;
}

// From d = g + wd p: the direction and the new momentum, m' = mu m + (1 - damp) d (m' = d where
// the buffer is not initialised), direction d + mu m' (nesterov) or m'.  One definition for the
// vector and the scalar loops of both passes.
template <typename X, typename T>
X sgd_direction(const SgdConsts<T>& k, bool ready, X d, X m, X* m_out) {
  if (!k.has_mom) return d;
  const X mn = ready ? m * X(k.mu) + d * X(k.damp) : d;
  *m_out = mn;
  return k.nesterov ? d + mn * X(k.mu) : mn;
}

template <typename V>
V where(const V& mask, const V& a, const V& b) {
  return V::blendv(b, a, mask);
}

// The float32 sums of squares of the norm pass are right between two ends.  Squares of |x| below
// 2**-63 (about 1e-19) are float32 subnormals or 0, so a sum below kSmallSumsq may have lost them
// (with a larger sum, what such squares lose is below 2**-36 of it); squares of |x| above 2**64
// (about 1.8e19) overflow.  A finite chunk whose float32 sum is past either end (rare: every element
// below about 1e-15, or one above 1e19) is summed again with double squares, which neither
// underflow nor overflow for float32, bfloat16 and float16 values.  float64 tensors square in double
// already.
constexpr double kSmallSumsq = 0x1p-100;

// Whether the chunk's sum of squares `total` (of opmath values; `nonfinite`: the gradient's flag) is
// summed again; any_nonzero() (asked only of a small sum) says whether a value was not 0.
template <typename opmath, typename F>
bool sum_again_in_double(double total, bool nonfinite, F&& any_nonzero) {
  if (nonfinite) return false;  // the step is skipped: the sum is not used
  if constexpr (std::is_same_v<opmath, double>) {
    return !std::isfinite(total);
  } else {
    return !std::isfinite(total) || (total < kSmallSumsq && any_nonzero());
  }
}

// The sum of squares of value(j) for j in [0, len) with double squares: eight double lanes, in a fixed
// order, then the tail (independent lanes, which the compiler vectorizes, rather than one chain of adds).
template <typename F>
double sumsq_in_double(int64_t len, F&& value) {
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const double v = value(j + k);
      lanes[k] += v * v;
    }
  }
  double total = 0;
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  for (; j < len; ++j) {
    const double v = value(j);
    total += v * v;
  }
  return total;
}

// The horizontal reductions of a vector loop's lanes: the sum of the squares' lanes (in double) and
// whether a lane of the gradient's |g| maxima was non-finite.
template <typename V>
void reduce_lanes(const V& acc, const V& gmax, double* total, bool* nonfinite) {
  using opmath = typename V::value_type;
  opmath lanes[V::size()], maxes[V::size()];
  acc.store(lanes);
  gmax.store(maxes);
  for (int64_t k = 0; k < V::size(); ++k) {
    *total += lanes[k];
    *nonfinite = *nonfinite || !std::isfinite(maxes[k]);
  }
}

// Whether a lane of the |x| maxima xmax, or the tail's maximum, is not 0.
template <typename V>
bool any_nonzero(const V& xmax, typename V::value_type tail_max) {
  typename V::value_type maxes[V::size()];
  xmax.store(maxes);
  bool any = tail_max != 0;
  for (int64_t k = 0; k < V::size(); ++k) any = any || maxes[k] != 0;
  return any;
}

// Sum of squares of the chunk's clipping source (gradient, or final update direction) and
// whether the gradient holds inf or NaN: float32 lanes (float64 for float64 tensors), again in double
// past the ends of float32's squares (sum_again_in_double).
template <typename T>
void norm_chunk(const Step& s, const Chunk& c, double* sumsq, bool* bad) {
  using opmath = at::opmath_type<T>;
  using V = Vectorized<opmath>;
  const T* g = s.grads[c.tensor].data_ptr<T>() + c.start;
  const T* p = s.params[c.tensor].data_ptr<T>() + c.start;
  const T* m = s.has_mom ? s.first_moments[c.tensor].data_ptr<T>() + c.start : nullptr;
  const bool ready = s.ready[c.tensor];
  const bool update = s.clip.clip_update;
  const opmath gs = s.sign * s.inv_scale;
  const SgdConsts<opmath> consts(s);
  // amax, amax2: |g| (its non-finite flag, and |x| when x = g); umax: |x| of the update direction
  V acc(0), amax(0), amax2(0), umax(0);
  auto vector_step = [&](int64_t at, V& gmax, auto update_tag) {
    V gv = Io<T>::load(g + at) * V(gs);
    gmax = at::vec::maximum(gmax, gv.abs());
    V x = gv, unused;
    if constexpr (decltype(update_tag)::value) {
      x = sgd_direction(consts, ready, with_decay(consts, gv, Io<T>::load(p + at)), m ? Io<T>::load(m + at) : V(0), &unused);
      umax = at::vec::maximum(umax, x.abs());
    }
    acc = acc + x * x;
  };
  int64_t i = 0;
  auto vector_loop = [&](auto update_tag) {  // one loop per clipping source, chosen once per chunk
    // two maxima in turn, so that the NaN-propagating maximum's latency does not hold up the sum
    // (whose order, one vector after another, stays that of a single loop)
    for (; i + 2 * V::size() <= c.len; i += 2 * V::size()) {
      vector_step(i, amax, update_tag);
      vector_step(i + V::size(), amax2, update_tag);
    }
    for (; i + V::size() <= c.len; i += V::size()) vector_step(i, amax, update_tag);
  };
  if (update) {
    vector_loop(std::true_type{});
  } else {
    vector_loop(std::false_type{});
  }
  amax = at::vec::maximum(amax, amax2);
  opmath tail = 0, tail_max = 0, tail_umax = 0;
  for (; i < c.len; ++i) {
    opmath gv = static_cast<opmath>(g[i]) * gs;
    tail_max = std::isnan(gv) ? gv : std::max(tail_max, std::abs(gv));
    opmath x = gv, unused;
    if (update) {
      x = sgd_direction(consts, ready, with_decay(consts, gv, static_cast<opmath>(p[i])), m ? static_cast<opmath>(m[i]) : opmath(0), &unused);
      tail_umax = std::max(tail_umax, std::abs(x));
    }
    tail += x * x;
  }
  double total = 0;
  bool nonfinite = !std::isfinite(tail_max);
  reduce_lanes(acc, amax, &total, &nonfinite);
  total += tail;
  auto nonzero = [&] { return update ? any_nonzero(umax, tail_umax) : any_nonzero(amax, tail_max); };
  if (sum_again_in_double<opmath>(total, nonfinite, nonzero)) {
    if (update) {
      total = sumsq_in_double(c.len, [&](int64_t j) {
        const opmath gv = static_cast<opmath>(g[j]) * gs;
        opmath unused;
        return static_cast<double>(sgd_direction(consts, ready, with_decay(consts, gv, static_cast<opmath>(p[j])),
                                                 m ? static_cast<opmath>(m[j]) : opmath(0), &unused));
      });
    } else {
      total = sumsq_in_double(c.len, [&](int64_t j) { return static_cast<double>(static_cast<opmath>(g[j]) * gs); });
    }
  }
  *sumsq = total;
  *bad = nonfinite;
}

// Another norm type's part of the chunk (torch_clip_fused/norm_type.py): sum of |x|^p in double (kNormPower;
// |x| itself for p = 1), or max |x| (kNormInf, NaN kept), of the clipping source x (gradient, or final update
// direction), one element after another in memory order; and whether the gradient holds inf or NaN.
template <typename T>
void norm_part_chunk(const Step& s, const Chunk& c, double* part, bool* bad) {
  using opmath = at::opmath_type<T>;
  const T* g = s.grads[c.tensor].data_ptr<T>() + c.start;
  const T* p = s.params[c.tensor].data_ptr<T>() + c.start;
  const T* m = s.has_mom ? s.first_moments[c.tensor].data_ptr<T>() + c.start : nullptr;
  const bool ready = s.ready[c.tensor];
  const bool update = s.clip.clip_update;
  const bool inf = s.clip.norm_kind == kNormInf;
  const double pw = s.clip.norm_p;
  const opmath gs = s.sign * s.inv_scale;
  const SgdConsts<opmath> consts(s);
  double acc = 0;
  bool nonfinite = false;
  for (int64_t j = 0; j < c.len; ++j) {
    const opmath gv = static_cast<opmath>(g[j]) * gs;
    nonfinite = nonfinite || !std::isfinite(gv);
    opmath x = gv, unused;
    if (update)
      x = sgd_direction(consts, ready, with_decay(consts, gv, static_cast<opmath>(p[j])),
                        m ? static_cast<opmath>(m[j]) : opmath(0), &unused);
    const double a = std::abs(static_cast<double>(x));
    if (inf) {
      acc = (std::isnan(a) || a > acc) ? a : acc;  // once NaN, NaN (as torch's max)
    } else {
      acc += pw == 1.0 ? a : std::pow(a, pw);
    }
  }
  *part = acc;
  *bad = nonfinite;
}

// Parts combined (torch_clip_fused/norm_type.py): sums, or maxima for kNormInf (NaN kept); a part's norm is
// part^(1/p) (inf: the part).
inline double combine_parts(int64_t kind, double a, double b) {
  if (kind != kNormInf) return a + b;
  return (std::isnan(a) || std::isnan(b)) ? NAN : std::max(a, b);
}
inline double part_norm(int64_t kind, double p, double part) {
  return kind == kNormInf ? part : kind == kNormPower ? std::pow(part, 1.0 / p) : std::sqrt(part);
}
inline double norm_part(int64_t kind, double p, double norm) {
  return kind == kNormInf ? norm : kind == kNormPower ? std::pow(norm, p) : norm * norm;
}

// Sum of squares of mul * x[0:len) and whether it holds inf or NaN: norm_chunk's arithmetic (float32
// lanes, again in double past the ends of float32's squares) for one unit's piece of a chunk or one
// chunk of a parameter.
template <typename T>
void sumsq_range(const T* x, int64_t len, at::opmath_type<T> mul, double* sumsq, bool* bad) {
  using opmath = at::opmath_type<T>;
  using V = Vectorized<opmath>;
  V acc(0), amax(0), amax2(0);
  auto vector_step = [&](int64_t at, V& xmax) {
    const V xv = Io<T>::load(x + at) * V(mul);
    xmax = at::vec::maximum(xmax, xv.abs());
    acc = acc + xv * xv;
  };
  int64_t i = 0;
  for (; i + 2 * V::size() <= len; i += 2 * V::size()) {  // two maxima in turn, as in norm_chunk
    vector_step(i, amax);
    vector_step(i + V::size(), amax2);
  }
  for (; i + V::size() <= len; i += V::size()) vector_step(i, amax);
  amax = at::vec::maximum(amax, amax2);
  opmath tail = 0, tail_max = 0;
  for (; i < len; ++i) {
    const opmath xv = static_cast<opmath>(x[i]) * mul;
    tail_max = std::isnan(xv) ? xv : std::max(tail_max, std::abs(xv));
    tail += xv * xv;
  }
  double total = 0;
  bool nonfinite = !std::isfinite(tail_max);
  if (i > 0) reduce_lanes(acc, amax, &total, &nonfinite);
  total += tail;
  if (sum_again_in_double<opmath>(total, nonfinite, [&] { return any_nonzero(amax, tail_max); }))
    total = sumsq_in_double(len, [&](int64_t j) { return static_cast<double>(static_cast<opmath>(x[j]) * mul); });
  *sumsq = total;
  *bad = nonfinite;
}

// Unit scope, pass 1 for one chunk: per unit piece of the chunk (segment j), the gradient's sum of
// squares in g_sq[j] and, with the relative threshold, the parameter's in p_sq[j]; the chunk's total
// in *sumsq.  Other scopes with the relative threshold: the chunk's gradient sum as norm_chunk and
// the parameter's in p_sq[0].
template <typename T>
void unit_norm_chunk(const Step& s, const Chunk& c, double* sumsq, bool* bad, double* g_sq, double* p_sq) {
  const T* g = s.grads[c.tensor].data_ptr<T>();
  const T* p = s.params[c.tensor].data_ptr<T>();
  const bool relative = s.clip.threshold == kRelative;
  if (s.clip.scope != kUnit) {
    norm_chunk<T>(s, c, sumsq, bad);
    bool unused;
    sumsq_range<T>(p + c.start, c.len, 1, p_sq, &unused);
    return;
  }
  const at::opmath_type<T> gs = s.sign * s.inv_scale;
  double total = 0;
  bool any_bad = false;
  tcf::for_each_segment(c.start, c.len, s.unit_len[c.tensor], [&](int64_t j, int64_t, int64_t start, int64_t len) {
    bool b = false, unused;
    sumsq_range<T>(g + start, len, gs, &g_sq[j], &b);
    if (relative) sumsq_range<T>(p + start, len, 1, &p_sq[j], &unused);
    total += g_sq[j];
    any_bad = any_bad || b;
  });
  *sumsq = total;
  *bad = any_bad;
}

// P(clip) = beta**alpha (linear) or beta**(alpha**2) (quadratic), as exp2(e * log2(beta)) in float32.
// P(clip) = beta**alpha (linear) or beta**(alpha**2) (quadratic), in R: float32, or float64 for
// float64 groups.
template <typename R>
R clip_probability(const Step& s, R alpha) {
  const R e = s.clip.randomization == kLinear ? alpha : alpha * alpha;
  return std::exp2(e * static_cast<R>(s.log2_beta));
}

constexpr float kTiny = 1.17549435e-38f;  // smallest normal float32: coordinate scope's alpha = eta / max(|x|, kTiny)

// alpha = eta / ||x|| of a clipped scope (||x|| > eta, so never 0 / 0), in double: R's quotient, except
// for a float32 norm past float32's range (+inf) whose double sum of squares sq is finite, where it is
// eta / sqrt(sq) (an exploding gradient is clipped to eta, never zeroed: docs/spec.md section 1), and
// except for a quotient below float32's normal range, taken in double.
template <typename R>
double clip_alpha(R eta, R norm, double sq) {
  if (std::isinf(norm) && std::isfinite(sq)) return static_cast<double>(eta) / std::sqrt(sq);
  const R alpha = eta / norm;
  // below float32's normal range a float32 quotient keeps few bits: taken again in double
  if (alpha < static_cast<R>(kTiny)) return static_cast<double>(eta) / static_cast<double>(norm);
  return static_cast<double>(alpha);
}

// The scale s = alpha of a clipped scope as two float32 factors, s = pre * post: pre = 1 and post = s
// where s is a normal float32; pre = 2**-64 and post = s * 2**64 below (an exploding gradient's scale,
// which a float32 subnormal would keep only a few bits of).  x * pre is exact unless x * s is itself
// below the normal range, so x * pre * post is x * s rounded once.
struct SplitScale {
  float pre, post;
};
inline SplitScale split_scale(double scale) {
  if (scale >= static_cast<double>(kTiny) || scale == 0 || !std::isfinite(scale))
    return {1.f, static_cast<float>(scale)};
  return {0x1p-64f, static_cast<float>(scale * 0x1p64)};
}

// Stochastic rounding (docs/spec.md section 3.1) of the float32 result x of the update to a
// bfloat16 / float16 parameter or momentum buffer.  The element at index i draws the Philox words at
// counter kSrIndex + i (torch_clip_fused.config.SR_INDEX; clipping draws stay below 2**40): word 0
// rounds p, word 1 rounds m.  Non-finite x rounds to nearest; other dtypes are not rounded so.
constexpr uint64_t kSrIndex = uint64_t(1) << 40;

template <typename T>
struct StochasticRound {
  static constexpr bool kApplies = false;
  template <typename X>
  static T round(X x, uint32_t) { return static_cast<T>(x); }
};

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

// bfloat16: the word's upper 16 bits added to the low 16 bits of x's bits, which are then dropped.
template <>
struct StochasticRound<at::BFloat16> {
  static constexpr bool kApplies = true;
  static at::BFloat16 round(float x, uint32_t word) {
    const uint32_t bits = float_bits(x);
    if ((bits & 0x7F800000u) == 0x7F800000u) return static_cast<at::BFloat16>(x);
    return at::BFloat16(static_cast<uint16_t>((bits + (word >> 16)) >> 16), at::BFloat16::from_bits());
  }
};

// float16: lo = |x| toward zero, hi the next float16 away from zero (65536 past the largest: inf),
// hi when (word >> 8) / 2**24 < (|x| - lo) / (hi - lo); every operation is exact in float32.
template <>
struct StochasticRound<at::Half> {
  static constexpr bool kApplies = true;
  static at::Half round(float x, uint32_t word) {
    const uint32_t bits = float_bits(x);
    if ((bits & 0x7F800000u) == 0x7F800000u) return static_cast<at::Half>(x);
    const float a = std::fabs(x);
    const at::Half nearest = static_cast<at::Half>(a);
    const uint32_t lo_bits = nearest.x - (static_cast<float>(nearest) > a ? 1u : 0u);
    const float lo = static_cast<float>(at::Half(static_cast<uint16_t>(lo_bits), at::Half::from_bits()));
    const uint32_t inv_ulp_bits = (152u - std::max<uint32_t>(lo_bits >> 10, 1u)) << 23;  // 2**(25 - max(e, 1))
    float inv_ulp;
    std::memcpy(&inv_ulp, &inv_ulp_bits, sizeof inv_ulp);
    const float u = static_cast<float>(word >> 8) * 5.9604644775390625e-08f;  // 2**-24
    const uint32_t out = (lo_bits + (u < (a - lo) * inv_ulp ? 1u : 0u)) | ((bits >> 31) << 15);
    return at::Half(static_cast<uint16_t>(out), at::Half::from_bits());
  }
};

// The tensor's AdamW constants in the arithmetic type R (float32, or float64 for float64 tensors).
template <typename R>
const tcf::AdamConsts<R>& adam_consts(const Step& s, int64_t t) {
  if constexpr (std::is_same_v<R, double>) {
    return s.adam64[t];
  } else {
    return s.adam32[t];
  }
}

// Pass 2 on the chunk c: g' = clipped g (times the tensor's scale at global / layer scope, its unit's
// at unit scope), then the SGD rule (kAdam false: direction, momentum, p -= lr d) or AdamW's (kAdam
// true, csrc/adamw_update.h), or g' written back (the clip-only rule).
template <typename T, bool kAdam>
int64_t apply_chunk(const Step& s, const Chunk& c) {
  using opmath = at::opmath_type<T>;
  using V = Vectorized<opmath>;
  T* g = s.grads[c.tensor].data_ptr<T>() + c.start;
  T* p = s.params[c.tensor].data_ptr<T>() + c.start;
  T* m = s.has_mom || kAdam ? s.first_moments[c.tensor].data_ptr<T>() + c.start : nullptr;
  T* v = kAdam ? s.exp_avg_sqs[c.tensor].data_ptr<T>() + c.start : nullptr;
  T* vmax = kAdam && s.sgd.amsgrad ? s.max_exp_avg_sqs[c.tensor].data_ptr<T>() + c.start : nullptr;
  tcf::AdamConsts<opmath> adam;  // a copy in registers (the loops store through pointers)
  if constexpr (kAdam) adam = adam_consts<opmath>(s, c.tensor);
  const bool ready = s.ready[c.tensor];
  const opmath gs = s.sign * s.inv_scale, level = s.clip.level;
  // the scale (at unit scope, per run of the chunk in one unit) as pre * scale: split_scale for float32
  // arithmetic, the double scale itself for float64 tensors
  opmath pre = 1, scale = 1;
  auto set_scale = [&](double value) {
    if constexpr (std::is_same_v<opmath, double>) {
      scale = value;
    } else {
      const SplitScale split = split_scale(value);
      pre = split.pre;
      scale = split.post;
    }
  };
  set_scale(s.tensor_scale[c.tensor]);
  const double* unit_scale = s.clip.scope == kUnit ? s.unit_scale.data() + s.unit_base[c.tensor] : nullptr;
  const int64_t unit_len = unit_scale ? s.unit_len[c.tensor] : 0;
  const opmath lr = s.sgd.lr;
  const SgdConsts<opmath> consts(s);
  const bool coordinate = s.clip.scope == kCoordinate, update = s.clip.clip_update;
  const bool clip_only = s.sgd.rule == kClipOnly;  // the epilogue writes g' = s g back to the gradient
  const int64_t inner = s.index_extra.empty() ? 1 : s.index_inner[c.tensor];
  const int64_t extra = s.index_extra.empty() ? 0 : s.index_extra[c.tensor];
  auto index_of = [&](int64_t i) -> uint64_t {  // element i of the chunk: its place in the unsharded group
    const int64_t l = c.start + i;
    return static_cast<uint64_t>(s.offsets[c.tensor] + l + (extra ? (l / inner) * extra : 0));
  };
  // p and m rounded stochastically: per element, in the scalar loop
  const bool stochastic = StochasticRound<T>::kApplies && s.sgd.stochastic_rounding && !clip_only;
  const bool vectorised = !(coordinate && s.clip.randomization != kNoRand) && !stochastic;
  int64_t clipped = 0;
  V lanes_clipped(0);

  // runs of elements with one scale: the whole chunk, or at unit scope each unit's piece of it
  for (int64_t run = 0, run_end = 0; run < c.len; run = run_end) {
    run_end = c.len;
    if (unit_scale) {
      const int64_t u = (c.start + run) / unit_len;
      run_end = std::min(c.len, (u + 1) * unit_len - c.start);
      set_scale(unit_scale[u]);
    }
    int64_t i = run;
    if (vectorised) {
      auto clip = [&](const V& x) {
        if (!coordinate) return pre == 1 ? x * V(scale) : x * V(pre) * V(scale);
        V above = x.abs() > V(level);
        lanes_clipped = lanes_clipped + (above & V(1));
        return where(above, where(x < V(0), V(-level), V(level)), x);
      };
      for (; i + V::size() <= run_end; i += V::size()) {
        V gv = Io<T>::load(g + i) * V(gs);
        if (clip_only) {
          Io<T>::store(g + i, clip(gv));
          continue;
        }
        if constexpr (kAdam) {
          V mn, vn, vmn;
          const V pn = tcf::adamw_update(adam, clip(gv), Io<T>::load(p + i), Io<T>::load(m + i), Io<T>::load(v + i),
                                         vmax ? Io<T>::load(vmax + i) : V(0), &mn, &vn, &vmn);
          Io<T>::store(p + i, pn);
          Io<T>::store(m + i, mn);
          Io<T>::store(v + i, vn);
          if (vmax) Io<T>::store(vmax + i, vmn);
          continue;
        }
        V pv = Io<T>::load(p + i);
        V mv = m ? Io<T>::load(m + i) : V(0);
        V mn = mv;
        V d = update ? sgd_direction(consts, ready, with_decay(consts, gv, pv), mv, &mn)
                     : sgd_direction(consts, ready, with_decay(consts, clip(gv), pv), mv, &mn);
        if (update) d = clip(d);
        Io<T>::store(p + i, pv - d * V(lr));
        if (m) Io<T>::store(m + i, mn);
      }
    }
    for (; i < run_end; ++i) {
      auto clip = [&](opmath x) -> opmath {
        if (!coordinate) return pre == 1 ? x * scale : x * pre * scale;
        const opmath mag = std::abs(x);
        bool hit = mag > level;
        if (hit && s.clip.randomization != kNoRand) {
          const opmath alpha = static_cast<opmath>(level) / std::max(mag, static_cast<opmath>(kTiny));
          hit = tcf::philox_uniform(s.key, index_of(i)) < clip_probability<opmath>(s, alpha);
        }
        clipped += hit;
        return hit ? (x < 0 ? -level : level) : x;
      };
      opmath gv = static_cast<opmath>(g[i]) * gs;
      if (clip_only) {
        g[i] = static_cast<T>(clip(gv));
        continue;
      }
      if constexpr (kAdam) {
        opmath mn, vn, vmn;
        const opmath pn = tcf::adamw_update(adam, clip(gv), static_cast<opmath>(p[i]), static_cast<opmath>(m[i]),
                                            static_cast<opmath>(v[i]), vmax ? static_cast<opmath>(vmax[i]) : opmath(0),
                                            &mn, &vn, &vmn);
        p[i] = static_cast<T>(pn);
        m[i] = static_cast<T>(mn);
        v[i] = static_cast<T>(vn);
        if (vmax) vmax[i] = static_cast<T>(vmn);
        continue;
      }
      opmath pv = static_cast<opmath>(p[i]);
      opmath mv = m ? static_cast<opmath>(m[i]) : opmath(0);
      opmath mn = mv;
      opmath d = update ? sgd_direction(consts, ready, with_decay(consts, gv, pv), mv, &mn)
                        : sgd_direction(consts, ready, with_decay(consts, clip(gv), pv), mv, &mn);
      if (update) d = clip(d);
      if (stochastic) {
        uint32_t words[4];
        tcf::philox_words(s.key, kSrIndex + index_of(i), words);
        p[i] = StochasticRound<T>::round(pv - d * lr, words[0]);
        if (m) m[i] = StochasticRound<T>::round(mn, words[1]);
        continue;
      }
      p[i] = static_cast<T>(pv - d * lr);
      if (m) m[i] = static_cast<T>(mn);
    }
  }
  opmath counts[V::size()];
  lanes_clipped.store(counts);
  for (int64_t k = 0; k < V::size(); ++k) clipped += static_cast<int64_t>(counts[k]);
  return clipped;
}

#define TCF_DISPATCH(dtype, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "clipped_sgd", __VA_ARGS__)

// Threshold policies (torch_clip_fused.methods.THRESHOLD_CODES): eta for one scope column, from the policy's
// kernel_params k (s.clip.params) and state (s.threshold; checked on entry).
// constant: the clipping level.  auto (AutoClip): record the norm (when the step is ok and the norm
// finite), then the nearest-rank p-quantile of the column's records, the current norm included.
// relative (AGC): level * max(||w||, eps), wnorm = ||w|| the parameters' norm over the same scope.
// R: float32, or float64 for float64 groups (whose state is float64).  norm64 / total64: norm and
// total in double (AdaGC's warm-up, for a norm past float32's range).
template <typename R>
R threshold(const Step& s, int64_t col, R norm, R total, bool ok, R wnorm, double norm64, double total64) {
  const std::vector<double>& k = s.clip.params;
  const ThresholdState& ts = s.threshold;
  const R level = static_cast<R>(s.clip.level);
  switch (s.clip.threshold) {
    case kConstant:
      return level;
    case kRelative:  // timm's max_norm = unitwise_norm(p).clamp_(min=eps).mul_(clip_factor) (NaN stays NaN)
      return (std::isnan(wnorm) ? wnorm : std::max(wnorm, static_cast<R>(k[0]))) * level;
    case kAuto:  // AutoClip (csrc/autoclip_history.h): values are the ring, sorted_values its sorted rows
      return tcf::autoclip_record_and_threshold<R>(ts.values->data_ptr<R>(), ts.sorted_values->data_ptr<R>(),
                                                   ts.counts->data_ptr<int64_t>() + col, ts.values->size(0),
                                                   ts.values->size(1), col, norm, ok && std::isfinite(norm), k[0]);
    case kZscore:  // ZClip (csrc/zscore_threshold.h)
      return tcf::zscore_record_and_threshold<R>(
          ts.values->data_ptr<R>(), ts.counts->data_ptr<int64_t>() + col, ts.values->size(0), ts.values->size(1),
          col, norm, ok && std::isfinite(norm), static_cast<R>(k[0]), static_cast<R>(k[1]), static_cast<R>(k[2]),
          static_cast<R>(kZclipEps), level, static_cast<int64_t>(k[3]), static_cast<R>(k[4]), k[5] != 0);
    case kEmaRelative:  // AdaGC (csrc/adagc_threshold.h): values are gamma [1, columns]
      return tcf::adagc_record_and_threshold<R>(
          ts.values->data_ptr<R>(), ts.counts->data_ptr<int64_t>() + col, col, norm, total, norm64, total64,
          ok && std::isfinite(norm) && std::isfinite(total), static_cast<R>(k[0]), static_cast<R>(k[1]),
          static_cast<int64_t>(k[2]), static_cast<R>(kAdagcEps), level);
    default:  // unreachable: codes are checked on entry
      return NAN;
  }
}

// Stage scales at global or layer scope: eta per scope column, alpha = eta / ||x||, s = alpha
// where ||x|| > eta (and u < P(clip) when randomized), else 1; stats[1:3] = mean eta, share clipped.
// param_norm / param_total: the parameters' per-tensor / global norms (relative threshold only).
// tensor_sq / total_sq: the double sums of squares of the norms (alpha of a norm past float32's range).
template <typename R, typename N>
void norm_scales(Step& s, const std::vector<N>& tensor_norm, R total, const std::vector<double>& tensor_sq,
                 double total_sq, bool ok, float* st, const std::vector<R>& param_norm, R param_total) {
  const int64_t n = static_cast<int64_t>(tensor_norm.size());
  const bool layer = s.clip.scope == kLayer;
  const int64_t groups = layer ? n : 1;
  double eta_sum = 0, clip_sum = 0;
  for (int64_t j = 0; j < groups; ++j) {
    const R norm = layer ? static_cast<R>(tensor_norm[j]) : total;
    const int64_t col = layer ? s.columns[j] : 0;
    const R wnorm = param_norm.empty() ? R(0) : layer ? param_norm[j] : param_total;
    const R eta = threshold<R>(s, col, norm, total, ok, wnorm, std::sqrt(layer ? tensor_sq[j] : total_sq),
                               std::sqrt(total_sq));
    bool clipped = norm > eta;
    const double alpha = clipped ? clip_alpha(eta, norm, layer ? tensor_sq[j] : total_sq) : 1.0;
    if (clipped && s.clip.randomization != kNoRand)
      clipped = tcf::philox_uniform(s.key, layer ? col : 0) < clip_probability<R>(s, static_cast<R>(alpha));
    const double scale = clipped ? alpha : 1.0;
    if (layer) {
      s.tensor_scale[j] = scale;
    } else {
      s.tensor_scale.assign(n, scale);
    }
    eta_sum += eta;
    clip_sum += clipped;
  }
  st[1] = static_cast<float>(eta_sum / groups);
  st[2] = static_cast<float>(clip_sum / groups);
}

// Stage scales at unit scope from the units' sums of squares (gradient, and parameter with the
// relative threshold; s.unit_base order): eta_u, alpha_u = eta_u / ||g_u||, s_u = alpha_u where
// ||g_u|| > eta_u (and, randomized, Philox u < P(clip) at index unit_offsets[i] + u), else 1, into
// s.unit_scale; stats[1:3] = mean eta and share clipped over the units.
template <typename R>
void unit_scales(Step& s, const std::vector<double>& unit_sq, const std::vector<double>& unit_psq,
                 const std::vector<int64_t>& unit_offsets, float* st) {
  const int64_t n = static_cast<int64_t>(s.params.size());
  const bool relative = s.clip.threshold == kRelative;
  const int64_t total_units = static_cast<int64_t>(unit_sq.size());
  s.unit_scale.assign(total_units, 1.0);
  double eta_sum = 0, clip_sum = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t base = s.unit_base[t], units = s.unit_base[t + 1] - base;
    for (int64_t u = 0; u < units; ++u) {
      const R norm = static_cast<R>(std::sqrt(unit_sq[base + u]));
      const R wnorm = relative ? static_cast<R>(std::sqrt(unit_psq[base + u])) : R(0);
      const R eta = relative ? threshold<R>(s, 0, norm, norm, true, wnorm, 0.0, 0.0) : static_cast<R>(s.clip.level);
      bool clipped = norm > eta;
      const double alpha = clipped ? clip_alpha(eta, norm, unit_sq[base + u]) : 1.0;
      if (clipped && s.clip.randomization != kNoRand)
        clipped = tcf::philox_uniform(s.key, static_cast<uint64_t>(unit_offsets[t] + u)) <
                  clip_probability<R>(s, static_cast<R>(alpha));
      s.unit_scale[base + u] = clipped ? alpha : 1.0;
      eta_sum += eta;
      clip_sum += clipped;
    }
  }
  st[1] = static_cast<float>(eta_sum / std::max<int64_t>(total_units, 1));
  st[2] = static_cast<float>(clip_sum / std::max<int64_t>(total_units, 1));
}

// Per-tensor telemetry (torch_clip_fused/tensor_stats.py) into out (float32 [2, G], row-major) at each
// tensor's column: row 0 its norm (NaN when no norm was taken or given), row 1 its scale: global / layer
// s.tensor_scale, unit scope the fraction of its units with a scale below 1, coordinate scope the fraction
// of its elements clipped (clipped: per chunk), no clipping 1; a skipped step's scales 1 (fractions 0).
void write_tensor_stats(const Step& s, const std::vector<float>& tensor_norm, bool have_norms, bool ok,
                        const std::vector<int64_t>& clipped, const std::vector<int64_t>& first_chunk, float* out,
                        int64_t width) {
  const int64_t n = static_cast<int64_t>(s.params.size());
  const bool unit = s.clip.scope == kUnit, coordinate = s.clip.scope == kCoordinate;
  for (int64_t t = 0; t < n; ++t) {
    double scale = 1.0;
    if (unit) {
      const int64_t base = s.unit_base[t], units = s.unit_base[t + 1] - base;
      int64_t below = 0;
      for (int64_t u = 0; u < units; ++u) below += s.unit_scale[base + u] < 1.0;
      scale = ok ? static_cast<double>(below) / std::max<int64_t>(units, 1) : 0.0;
    } else if (coordinate) {
      int64_t hits = 0;
      for (int64_t k = first_chunk[t]; k < first_chunk[t + 1]; ++k) hits += clipped[k];
      scale = ok ? static_cast<double>(hits) / std::max<int64_t>(s.params[t].numel(), 1) : 0.0;
    } else if (ok) {
      scale = s.tensor_scale[t];
    }
    out[s.columns[t]] = have_norms ? tensor_norm[t] : NAN;
    out[width + s.columns[t]] = static_cast<float>(scale);
  }
}

}  // namespace

// A failed check returns its message, which the Python side raises: no exception is thrown on the
// way (on torch 2.11 a C++ exception thrown here killed the process, docs/first-gpu-findings.md,
// "A C++ error that killed the process on torch 2.11"), and every check runs before the parallel regions.
// The message is formatted here with std::ostringstream rather than c10::str / TORCH_CHECK, which
// pass std::string into libc10: a guess, not yet checked on torch 2.11, at what the crashes seen
// there with both a thrown and a returned error still share.
template <typename... Args>
std::string tcf_message(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
#define TCF_CHECK(cond, ...)                              \
  do {                                                    \
    if (!(cond)) return tcf_message(__VA_ARGS__);         \
  } while (0)

namespace {

// What a threshold policy's kernel code reads: its name in messages, how many kernel_params, and for a
// stateful policy the rows its values may have (min_rows..max_rows, described in `rows`) and whether it
// keeps sorted rows.
struct PolicyNeeds {
  const char* name;
  size_t params;
  bool stateful, sorted;
  int64_t min_rows, max_rows;
  const char* rows;
};

PolicyNeeds policy_needs(int64_t threshold) {
  constexpr int64_t kAny = INT64_MAX;
  switch (threshold) {
    case kAuto:  // the ring [capacity, columns]
      return {"AutoClip", 1, true, true, 1, kAny, "rows > 0"};
    case kZscore:  // EMA mean, EMA variance and the W >= 1 warm-up norms: [2 + W, columns]
      return {"zscore (ZClip)", 6, true, false, 3, kAny, "rows >= 3"};
    case kEmaRelative:  // gamma [1, columns]
      return {"ema_relative (AdaGC)", 3, true, false, 1, 1, "1"};
    case kRelative:
      return {"relative (AGC)", 1, false, false, 0, 0, ""};
    default:
      return {"constant", 0, false, false, 0, 0, ""};
  }
}

// The threshold policy's kernel_params and state, checked before anything is read or written: every
// index the threshold stage will use is inside the state.  value_type: the group's norm arithmetic.
std::string check_threshold(const ClipOptions& clip, const ThresholdState& ts, const std::vector<int64_t>& columns,
                            at::ScalarType value_type) {
  const PolicyNeeds need = policy_needs(clip.threshold);
  const std::vector<double>& k = clip.params;
  TCF_CHECK(k.size() >= need.params, "backend='cpp': the ", need.name, " threshold reads ", need.params,
            " kernel_params (ClipOptions.params), got ", k.size());
  TCF_CHECK(clip.threshold != kRelative || (std::isfinite(k[0]) && k[0] >= 0), "backend='cpp': agc_eps is ", k[0],
            ", expected a finite value >= 0");
  TCF_CHECK(clip.threshold != kEmaRelative || (k[2] >= 0 && k[2] < 0x1p62), "backend='cpp': adagc_warmup is ",
            k[2], ", expected an integer >= 0");
  TCF_CHECK(clip.threshold != kZscore || k[3] == tcf::kZclipAdaptiveScaling || k[3] == tcf::kZclipMean ||
                k[3] == tcf::kZclipPercentile,
            "backend='cpp': the zscore (ZClip) clip-value code (kernel_params[3]) is ", k[3],
            ", expected 0 (adaptive_scaling), 1 (mean) or 2 (percentile)");
  if (!need.stateful) return {};
  TCF_CHECK(ts.values.has_value() && ts.counts.has_value() && (!need.sorted || ts.sorted_values.has_value()),
            "backend='cpp': the ", need.name, " threshold needs its state (threshold_state, threshold_count",
            need.sorted ? " and its sorted rows, threshold_sorted)" : ")");
  if (clip.scope != kGlobal && clip.scope != kLayer) return {};
  const at::Tensor& values = *ts.values;
  TCF_CHECK(values.device().is_cpu() && values.dim() == 2 && values.scalar_type() == value_type &&
                values.is_contiguous() && values.size(0) >= need.min_rows && values.size(0) <= need.max_rows,
            "backend='cpp': the ", need.name, " threshold state must be a contiguous ", value_type, " [", need.rows,
            ", columns] CPU tensor, got ", values.sizes(), " ", values.scalar_type(), " on ", values.device());
  const int64_t rows = values.size(0), n_cols = values.size(1);
  const at::Tensor& counts = *ts.counts;
  TCF_CHECK(counts.device().is_cpu() && counts.dim() == 1 && counts.scalar_type() == at::kLong &&
                counts.numel() == n_cols && counts.is_contiguous(),
            "backend='cpp': the ", need.name, " counts must be a contiguous int64 [", n_cols, "] CPU tensor, got ",
            counts.sizes(), " ", counts.scalar_type(), " on ", counts.device());
  if (need.sorted) {
    const at::Tensor& sorted = *ts.sorted_values;
    TCF_CHECK(sorted.device().is_cpu() && sorted.dim() == 2 && sorted.scalar_type() == value_type &&
                  sorted.is_contiguous() && sorted.size(0) == n_cols && sorted.size(1) == rows,
              "backend='cpp': the ", need.name, " sorted rows must be a contiguous ", value_type, " [", n_cols, ", ",
              rows, "] CPU tensor, got ", sorted.sizes(), " ", sorted.scalar_type(), " on ", sorted.device());
  }
  const int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t c = 0; c < n_cols; ++c)
    TCF_CHECK(count[c] >= 0, "backend='cpp': ", need.name, " count of column ", c, " is ", count[c],
              " (a corrupt state: counts are >= 0)");
  TCF_CHECK(clip.scope != kGlobal || n_cols == 1, "backend='cpp': a global-scope ", need.name,
            " threshold state has 1 column, got ", n_cols);
  for (size_t t = 0; t < (clip.scope == kLayer ? columns.size() : 0); ++t)
    TCF_CHECK(columns[t] >= 0 && columns[t] < n_cols, "backend='cpp': column ", columns[t], " of tensor ", t,
              " is outside the ", need.name, " threshold state's ", n_cols, " columns");
  return {};
}

// The update rule's per-parameter state, each one CPU tensor per parameter with its dtype and layout: SGD
// with momentum, first_moments (the momentum buffers); AdamW, first_moments (exp_avg), exp_avg_sqs and
// with amsgrad max_exp_avg_sqs.
std::string check_moments(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& first_moments,
                          const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& max_exp_avg_sqs,
                          const UpdateOptions& sgd) {
  const bool adamw = sgd.rule == kAdamW;
  struct Moments {
    const std::vector<at::Tensor>& tensors;
    const char* name;
    bool needed;
  };
  const Moments all[] = {{first_moments, adamw ? "exp_avg" : "momentum buffer", adamw || sgd.momentum != 0},
                         {exp_avg_sqs, "exp_avg_sq", adamw},
                         {max_exp_avg_sqs, "max_exp_avg_sq", adamw && sgd.amsgrad}};
  for (const Moments& m : all) {
    if (!m.needed) continue;
    TCF_CHECK(m.tensors.size() == params.size(), "backend='cpp': ", adamw ? "AdamW" : "SGD with momentum",
              " needs one ", m.name, " per parameter, got ", m.tensors.size(), " for ", params.size(), " params");
    for (size_t t = 0; t < params.size(); ++t) {
      const at::Tensor& x = m.tensors[t];
      TCF_CHECK(x.device().is_cpu() && same_layout(params[t], x) && x.scalar_type() == params[t].scalar_type(),
                "backend='cpp': the ", m.name, " of parameter ", t, " (", x.scalar_type(), ", strides ", x.strides(),
                ") must be a CPU tensor with the parameter's dtype and layout (", params[t].scalar_type(),
                ", strides ", params[t].strides(), ")");
    }
  }
  return {};
}

}  // namespace

// One step of one param group: stages norms (pass 1), scales (between the passes, one thread) and
// apply (pass 2).  Every argument is passed by name from torch_clip_fused/backends/cpp/loader.py:
// first_moments are SGD's momentum buffers or AdamW's exp_avg; threshold_state / threshold_count /
// threshold_sorted the threshold policy's state (values, counts, sorted_values: ThresholdState).
std::string clipped_sgd_step(
    std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> first_moments,
    std::vector<int64_t> columns, std::vector<int64_t> offsets, int64_t seed, at::Tensor step,
    at::Tensor ready, at::Tensor stats, at::Tensor skipped, c10::optional<at::Tensor> grad_scale,
    c10::optional<at::Tensor> found_inf, c10::optional<at::Tensor> norms, const ClipOptions& clip,
    const UpdateOptions& sgd, c10::optional<at::Tensor> threshold_state, c10::optional<at::Tensor> threshold_count,
    c10::optional<at::Tensor> threshold_sorted, std::vector<at::Tensor> exp_avg_sqs,
    std::vector<at::Tensor> max_exp_avg_sqs, c10::optional<at::Tensor> adam_steps, std::vector<int64_t> unit_offsets,
    std::vector<int64_t> index_inner, std::vector<int64_t> index_extra, c10::optional<at::Tensor> given_sums,
    c10::optional<at::Tensor> tensor_stats) {
  const int64_t n = static_cast<int64_t>(params.size());
  bool f64 = n > 0;  // a float64 group: norms, thresholds, scales and the threshold state in float64
  for (int64_t t = 0; t < n; ++t) f64 = f64 && params[t].scalar_type() == at::kDouble;
  const auto state_type = f64 ? at::kDouble : at::kFloat;
  // codes are validated before anything is read or written: an unknown one is an error, never a fallback
  TCF_CHECK(clip.scope >= kNone && clip.scope <= kUnit, "backend='cpp': unknown scope code ", clip.scope);
  TCF_CHECK(clip.threshold == kConstant || clip.threshold == kAuto || clip.threshold == kZscore ||
                clip.threshold == kEmaRelative || clip.threshold == kRelative,
            "backend='cpp': unknown threshold code ", clip.threshold);
  TCF_CHECK(clip.randomization >= kNoRand && clip.randomization <= kQuadratic,
            "backend='cpp': unknown randomization code ", clip.randomization);
  TCF_CHECK(sgd.rule == kSgd || sgd.rule == kClipOnly || sgd.rule == kAdamW,
            "backend='cpp': unknown update rule code ", sgd.rule);
  const bool unit = clip.scope == kUnit, relative = clip.threshold == kRelative;
  TCF_CHECK(!unit || clip.threshold == kConstant || relative,
            "backend='cpp': unit scope takes a constant or relative threshold, got threshold code ", clip.threshold);
  TCF_CHECK(!relative || clip.scope == kGlobal || clip.scope == kLayer || unit,
            "backend='cpp': the relative threshold takes global, layer or unit scope, got scope code ", clip.scope);
  TCF_CHECK(clip.norm_kind == kNormTwo || ((clip.norm_kind == kNormInf || clip.norm_kind == kNormPower) &&
                                             !unit && !relative && clip.norm_p >= 1),
            "backend='cpp': norm kind ", clip.norm_kind, " with p = ", clip.norm_p,
            ": expected 0 (2-norm), 1 (inf) or 2 (p >= 1), and the 2-norm at unit scope and with the relative "
            "threshold");
  TCF_CHECK(!(unit || relative) || (!clip.clip_update && (!clip.norms_given || given_sums.has_value())),
            "backend='cpp': unit scope and the relative threshold clip the gradient (clip_point='grad') with norms "
            "they compute themselves, or with given norms and the given sums of squares of the units and weights");
  // given_sums (GroupTensors.given_sums, a sharded group's): float64, at unit scope [U] the gradients' units then
  // (relative threshold) [U] the parameters'; with the relative threshold at global / layer scope [n] the
  // parameters' per-tensor sums of squares; their size is checked with the units below
  const bool sums_given = clip.norms_given && (unit || relative) && given_sums.has_value();
  TCF_CHECK(!sums_given || (given_sums->device().is_cpu() && given_sums->scalar_type() == at::kDouble &&
                            given_sums->is_contiguous()),
            "backend='cpp': given_sums must be a contiguous float64 CPU tensor");
  TCF_CHECK(!unit || clip.randomization == kNoRand || static_cast<int64_t>(unit_offsets.size()) == n,
            "backend='cpp': randomized unit scope needs the unit offsets of the ", n, " tensors, got ",
            unit_offsets.size());
  const bool adamw = sgd.rule == kAdamW;
  TCF_CHECK(!adamw || (!clip.clip_update && !sgd.stochastic_rounding && sgd.momentum == 0),
            "backend='cpp': AdamW clips the gradient (clip_point='grad') and has no stochastic rounding or SGD "
            "momentum");
  TCF_CHECK(!(clip.norms_given || !clip.apply) ||
                (norms.has_value() && (norms->scalar_type() == at::kFloat || norms->scalar_type() == at::kDouble) &&
                 norms->is_contiguous() && norms->numel() == n + 1),
            "backend='cpp': the norms tensor must be a contiguous float32 or float64 tensor of ", n + 1, " elements");
  TCF_CHECK(static_cast<int64_t>(grads.size()) == n, "clipped_sgd_step: ", grads.size(), " grads for ", n, " params");
  TCF_CHECK(static_cast<int64_t>(columns.size()) == n && static_cast<int64_t>(offsets.size()) == n,
            "clipped_sgd_step: ", columns.size(), " columns and ", offsets.size(), " offsets for ", n, " params");
  TCF_CHECK(index_inner.size() == index_extra.size() &&
                (index_inner.empty() || static_cast<int64_t>(index_inner.size()) == n),
            "clipped_sgd_step: ", index_inner.size(), " index_inner and ", index_extra.size(), " index_extra for ", n,
            " params (expected both empty or one per param)");
  for (size_t t = 0; t < index_inner.size(); ++t) {
    TCF_CHECK(index_inner[t] >= 1 && index_extra[t] >= 0, "clipped_sgd_step: index_inner ", index_inner[t],
              " and index_extra ", index_extra[t], " of param ", t, ", expected >= 1 and >= 0");
  }
  TCF_CHECK(!tensor_stats.has_value() ||
                (tensor_stats->device().is_cpu() && tensor_stats->scalar_type() == at::kFloat &&
                 tensor_stats->dim() == 2 && tensor_stats->size(0) == 2 && tensor_stats->is_contiguous()),
            "backend='cpp': tensor_stats must be a contiguous float32 [2, params in group] CPU tensor");
  for (int64_t t = 0; t < n && tensor_stats.has_value(); ++t)
    TCF_CHECK(columns[t] >= 0 && columns[t] < tensor_stats->size(1), "backend='cpp': column ", columns[t],
              " of tensor ", t, " is outside the ", tensor_stats->size(1), " columns of tensor_stats");
  const ThresholdState ts{std::move(threshold_state), std::move(threshold_count), std::move(threshold_sorted)};
  const std::string threshold_error = check_threshold(clip, ts, columns, state_type);
  if (!threshold_error.empty()) return threshold_error;
  TCF_CHECK(ready.scalar_type() == at::kBool, "clipped_sgd_step: ready flags must be bool, got ", ready.scalar_type());
  for (int64_t t = 0; t < n; ++t)
    TCF_CHECK(sgd.momentum == 0 || (columns[t] >= 0 && columns[t] < ready.numel()), "clipped_sgd_step: column ",
              columns[t], " of tensor ", t, " is outside the ", ready.numel(), " momentum-ready flags");
  for (int64_t t = 0; t < n; ++t) {
    TCF_CHECK(params[t].device().is_cpu() && grads[t].device().is_cpu(), "backend='cpp' needs CPU tensors (tensor ",
              t, ")");
    TCF_CHECK(params[t].is_non_overlapping_and_dense(), "backend='cpp': parameter ", t, " (strides ",
              params[t].strides(), ") is not dense in memory; make it contiguous or use backend='reference'");
    TCF_CHECK(same_layout(params[t], grads[t]), "backend='cpp': the gradient of parameter ", t, " has strides ",
              grads[t].strides(), " but the parameter has ", params[t].strides(),
              "; give them the same memory layout or use backend='reference'");
    TCF_CHECK(params[t].scalar_type() == grads[t].scalar_type(), "backend='cpp': tensor ", t, " has a ",
              params[t].scalar_type(), " parameter and a ", grads[t].scalar_type(), " gradient");
    TCF_CHECK(!unit || tcf::units_contiguous(params[t]), "backend='cpp': parameter ", t, " (sizes ",
              params[t].sizes(), ", strides ", params[t].strides(),
              ") does not keep each unit (slice along dim 0) contiguous, which unit scope needs");
  }
  const std::string moments_error = check_moments(params, first_moments, exp_avg_sqs, max_exp_avg_sqs, sgd);
  if (!moments_error.empty()) return moments_error;
  if (adamw) {  // the step counts by column
    TCF_CHECK(adam_steps.has_value() && adam_steps->device().is_cpu() && adam_steps->scalar_type() == at::kFloat &&
                  adam_steps->dim() == 1 && adam_steps->is_contiguous(),
              "backend='cpp': AdamW needs its step counts as a contiguous float32 [params in group] CPU tensor");
    for (int64_t t = 0; t < n; ++t)
      TCF_CHECK(columns[t] >= 0 && columns[t] < adam_steps->numel(), "backend='cpp': column ", columns[t],
                " of tensor ", t, " is outside the ", adam_steps->numel(), " AdamW step counts");
  }
  Step s;
  s.params = params;
  s.grads = grads;
  s.first_moments = first_moments;
  s.threshold = ts;
  s.exp_avg_sqs = exp_avg_sqs;
  s.max_exp_avg_sqs = max_exp_avg_sqs;
  s.columns = columns;
  s.offsets = offsets;
  s.index_inner = index_inner;
  s.index_extra = index_extra;
  s.clip = clip;
  s.sgd = sgd;
  s.has_mom = sgd.momentum != 0;
  s.sign = sgd.maximize ? -1.0 : 1.0;
  s.inv_scale = grad_scale.has_value() ? 1.0 / static_cast<double>(grad_scale->item<float>()) : 1.0;
  s.log2_beta = static_cast<float>(std::log2(clip.beta));  // as float(math.log2(beta)) in Python
  int64_t* step_ptr = step.data_ptr<int64_t>();
  s.key = (static_cast<uint64_t>(*step_ptr) << 32) | static_cast<uint64_t>(seed);
  bool* ready_ptr = ready.data_ptr<bool>();
  s.ready.resize(n);
  for (int64_t t = 0; t < n; ++t) s.ready[t] = s.has_mom && ready_ptr[columns[t]];
  std::vector<int64_t> first_chunk(n + 1);
  for (int64_t t = 0; t < n; ++t) {
    first_chunk[t] = static_cast<int64_t>(s.chunks.size());
    const int64_t numel = params[t].numel();
    for (int64_t start = 0; start < numel; start += kChunk) s.chunks.push_back({t, start, std::min(kChunk, numel - start)});
  }
  first_chunk[n] = static_cast<int64_t>(s.chunks.size());
  const int64_t n_chunks = first_chunk[n];
  TCF_CHECK(!sums_given || unit || given_sums->numel() == n, "backend='cpp': given_sums has ",
            sums_given ? given_sums->numel() : 0, " elements, expected the ", n, " parameters' sums of squares");
  // unit scope: each chunk's pieces in one unit (segments), seg_first[k] the index of chunk k's first
  std::vector<int64_t> seg_first(unit ? n_chunks + 1 : 0, 0);
  if (unit) {
    s.unit_len.resize(n);
    s.unit_base.resize(n + 1);
    int64_t units = 0;
    for (int64_t t = 0; t < n; ++t) {
      s.unit_base[t] = units;
      const int64_t count = tcf::unit_count(params[t]);
      s.unit_len[t] = count > 0 ? params[t].numel() / count : 0;
      units += count;
    }
    s.unit_base[n] = units;
    TCF_CHECK(!sums_given || given_sums->numel() == units * (relative ? 2 : 1), "backend='cpp': given_sums has ",
              sums_given ? given_sums->numel() : 0, " elements, expected ", units * (relative ? 2 : 1), " (", units,
              " units", relative ? ", gradients then parameters)" : ")");
    for (int64_t k = 0; k < n_chunks; ++k) {
      const Chunk& c = s.chunks[k];
      seg_first[k + 1] = seg_first[k] + tcf::segment_count(c.start, c.len, s.unit_len[c.tensor]);
    }
  }

  // pass 1: norms (unit scope / relative threshold: also per unit, and the parameters' sums of squares)
  std::vector<double> partial(n_chunks, 0.0);
  std::vector<char> bad(n_chunks, 0);
  const int64_t n_segs = unit ? seg_first[n_chunks] : 0;
  std::vector<double> seg_sq(n_segs, 0.0);  // unit scope: gradient sums per segment
  std::vector<double> param_sq(relative ? (unit ? n_segs : n_chunks) : 0, 0.0);  // per segment / chunk
  if ((clip.norms_needed || (clip.apply && (unit || relative))) && !clip.norms_given) {
    if (unit || relative) {
      at::parallel_for(0, n_chunks, kParallelGrain, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const Chunk& c = s.chunks[k];
          const int64_t first = unit ? seg_first[k] : k;
          bool b = false;
          TCF_DISPATCH(params[c.tensor].scalar_type(), [&] {
            unit_norm_chunk<scalar_t>(s, c, &partial[k], &b, unit ? &seg_sq[first] : nullptr,
                                      relative ? &param_sq[first] : nullptr);
          });
          bad[k] = b;
        }
      });
    } else if (clip.norm_kind != kNormTwo) {  // another norm type: each chunk's part (norm_part_chunk)
      at::parallel_for(0, n_chunks, kParallelGrain, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const Chunk& c = s.chunks[k];
          bool b = false;
          TCF_DISPATCH(params[c.tensor].scalar_type(), [&] { norm_part_chunk<scalar_t>(s, c, &partial[k], &b); });
          bad[k] = b;
        }
      });
    } else {
      at::parallel_for(0, n_chunks, kParallelGrain, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const Chunk& c = s.chunks[k];
          bool b = false;
          TCF_DISPATCH(params[c.tensor].scalar_type(), [&] { norm_chunk<scalar_t>(s, c, &partial[k], &b); });
          bad[k] = b;
        }
      });
    }
  }
  // reduce, in chunk order
  std::vector<float> tensor_norm(n, 0.f);
  std::vector<double> tensor_sq(n, 0.0), norm64(n, 0.0);  // norm64: the norms in double (computed, or given)
  double total_sq = 0;
  bool any_bad = false;
  const int64_t kind = clip.norm_kind;
  if (kind == kNormTwo) {
    for (int64_t t = 0; t < n; ++t) {
      double sq = 0;
      for (int64_t k = first_chunk[t]; k < first_chunk[t + 1]; ++k) {
        sq += partial[k];
        any_bad = any_bad || bad[k];
      }
      norm64[t] = std::sqrt(sq);
      tensor_norm[t] = static_cast<float>(norm64[t]);
      tensor_sq[t] = sq;
      total_sq += sq;
    }
  } else {  // parts (norm_part_chunk), combined in chunk order then tensor order; tensor_sq / total_sq: norm^2
    double total_part = 0;
    for (int64_t t = 0; t < n; ++t) {
      double part = 0;
      for (int64_t k = first_chunk[t]; k < first_chunk[t + 1]; ++k) {
        part = combine_parts(kind, part, partial[k]);
        any_bad = any_bad || bad[k];
      }
      norm64[t] = part_norm(kind, clip.norm_p, part);
      tensor_norm[t] = static_cast<float>(norm64[t]);
      tensor_sq[t] = norm64[t] * norm64[t];
      total_part = combine_parts(kind, total_part, part);
    }
    const double total_norm = part_norm(kind, clip.norm_p, total_part);
    total_sq = total_norm * total_norm;
  }
  double total64 = std::sqrt(total_sq);
  float total = clip.norms_needed ? static_cast<float>(total64) : NAN;
  if (norms.has_value()) {  // per-tensor norms then the global norm: given (second half) or returned
    // a float32 or float64 tensor: float64 norms keep a float64 group's, and norms past float32's range
    const bool given64 = norms->scalar_type() == at::kDouble;
    float* out = given64 ? nullptr : norms->data_ptr<float>();
    double* out64 = given64 ? norms->data_ptr<double>() : nullptr;
    if (clip.norms_given) {
      double given_sq = 0, given_part = 0;
      for (int64_t t = 0; t < n; ++t) {
        norm64[t] = given64 ? out64[t] : static_cast<double>(out[t]);
        tensor_norm[t] = static_cast<float>(norm64[t]);
        tensor_sq[t] = norm64[t] * norm64[t];
        given_sq += tensor_sq[t];
        if (kind != kNormTwo) given_part = combine_parts(kind, given_part, norm_part(kind, clip.norm_p, norm64[t]));
      }
      if (kind != kNormTwo) {  // the per-tensor p-norms' global p-norm, squared
        const double given_norm = part_norm(kind, clip.norm_p, given_part);
        given_sq = given_norm * given_norm;
      }
      total64 = given64 ? out64[n] : static_cast<double>(out[n]);
      total = static_cast<float>(total64);
      // a global norm past float32's range (given as +inf): the per-tensor norms' sum, when finite
      total_sq = std::isinf(total64) && std::isfinite(given_sq) ? given_sq : total64 * total64;
      any_bad = std::isnan(total);  // a NaN global norm marks a non-finite gradient (sharded groups, any rank)
    } else if (given64) {
      std::copy(norm64.begin(), norm64.end(), out64);
      out64[n] = clip.norms_needed ? total64 : NAN;
    } else {
      std::copy(tensor_norm.begin(), tensor_norm.end(), out);
      out[n] = total;
    }
  }
  if (!clip.apply) return std::string();
  // a tensor lr gone bad (non-finite or negative) skips the step, as a non-finite gradient does
  bool ok = !(clip.check_finite && any_bad) && (sgd.rule == kClipOnly || (std::isfinite(sgd.lr) && sgd.lr >= 0));
  if (found_inf.has_value()) ok = ok && found_inf->item<float>() == 0.f;

  // thresholds and scales
  float* st = stats.data_ptr<float>();
  st[0] = total;
  s.tensor_scale.assign(n, 1.0);
  if (unit) {  // the units' sums, each in chunk order
    std::vector<double> unit_sq(s.unit_base[n], 0.0), unit_psq(relative ? s.unit_base[n] : 0, 0.0);
    if (sums_given) {  // reduced across the ranks that split the units
      const double* given = given_sums->data_ptr<double>();
      std::copy(given, given + s.unit_base[n], unit_sq.begin());
      if (relative) std::copy(given + s.unit_base[n], given + 2 * s.unit_base[n], unit_psq.begin());
    }
    for (int64_t k = 0; k < (sums_given ? 0 : n_chunks); ++k) {
      const Chunk& c = s.chunks[k];
      const int64_t u0 = s.unit_base[c.tensor] + tcf::first_unit(c.start, s.unit_len[c.tensor]);
      for (int64_t j = seg_first[k]; j < seg_first[k + 1]; ++j) {
        unit_sq[u0 + j - seg_first[k]] += seg_sq[j];
        if (relative) unit_psq[u0 + j - seg_first[k]] += param_sq[j];
      }
    }
    if (f64) {
      unit_scales<double>(s, unit_sq, unit_psq, unit_offsets, st);
    } else {
      unit_scales<float>(s, unit_sq, unit_psq, unit_offsets, st);
    }
  } else if (clip.scope == kGlobal || clip.scope == kLayer) {
    // relative threshold: the parameters' per-tensor and global sums of squares, in chunk order
    std::vector<double> tensor_psq(relative ? n : 0, 0.0);
    double total_psq = 0;
    for (int64_t t = 0; t < (relative ? n : 0); ++t) {
      if (sums_given) {
        tensor_psq[t] = given_sums->data_ptr<double>()[t];  // reduced across ranks
      } else {
        for (int64_t k = first_chunk[t]; k < first_chunk[t + 1]; ++k) tensor_psq[t] += param_sq[k];
      }
      total_psq += tensor_psq[t];
    }
    if (f64) {  // float64 groups: norms, thresholds and scales in float64
      std::vector<double> pnorm64(tensor_psq.size());
      for (size_t t = 0; t < tensor_psq.size(); ++t) pnorm64[t] = std::sqrt(tensor_psq[t]);
      norm_scales<double>(s, norm64, total64, tensor_sq, total_sq, ok, st, pnorm64, std::sqrt(total_psq));
    } else {
      std::vector<float> pnorm(tensor_psq.size());
      for (size_t t = 0; t < tensor_psq.size(); ++t) pnorm[t] = static_cast<float>(std::sqrt(tensor_psq[t]));
      norm_scales<float>(s, tensor_norm, total, tensor_sq, total_sq, ok, st, pnorm,
                         static_cast<float>(std::sqrt(total_psq)));
    }
  } else if (clip.scope == kCoordinate) {
    st[1] = static_cast<float>(clip.level);
  } else {
    st[1] = INFINITY;
    st[2] = 0.f;
  }

  // pass 2: apply
  std::vector<int64_t> clipped(n_chunks, 0);  // coordinates clipped per chunk
  if (ok) {
    float* adam_step_ptr = adamw ? adam_steps->data_ptr<float>() : nullptr;
    if (adamw) {  // per tensor: t = its steps + 1 (a float32 count, as torch's state["step"])
      s.adam32.resize(n);
      s.adam64.resize(n);
      for (int64_t t = 0; t < n; ++t) {
        const double count = static_cast<double>(adam_step_ptr[columns[t]] + 1.0f);
        s.adam32[t] = tcf::AdamConsts<float>(sgd.lr, sgd.weight_decay, sgd.beta1, sgd.beta2, sgd.eps, sgd.amsgrad,
                                             count);
        s.adam64[t] = tcf::AdamConsts<double>(sgd.lr, sgd.weight_decay, sgd.beta1, sgd.beta2, sgd.eps,
                                              sgd.amsgrad, count);
      }
    }
    at::parallel_for(0, n_chunks, kParallelGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const Chunk& c = s.chunks[k];
        TCF_DISPATCH(params[c.tensor].scalar_type(), [&] {
          clipped[k] = adamw ? apply_chunk<scalar_t, true>(s, c) : apply_chunk<scalar_t, false>(s, c);
        });
      }
    });
    if (adamw)
      for (int64_t t = 0; t < n; ++t) adam_step_ptr[columns[t]] += 1.0f;
    if (clip.scope == kCoordinate) {
      int64_t hits = 0, numel = 0;
      for (int64_t k = 0; k < n_chunks; ++k) hits += clipped[k];
      for (int64_t t = 0; t < n; ++t) numel += params[t].numel();
      st[2] = static_cast<float>(static_cast<double>(hits) / std::max<int64_t>(numel, 1));
    }
    if (s.has_mom && sgd.rule == kSgd)
      for (int64_t t = 0; t < n; ++t) ready_ptr[columns[t]] = true;
  } else {
    st[2] = 0.f;  // a skipped step clips nothing
  }
  st[3] = ok ? 0.f : 1.f;
  if (tensor_stats.has_value())
    write_tensor_stats(s, tensor_norm, clip.norms_needed || clip.norms_given, ok, clipped, first_chunk,
                       tensor_stats->data_ptr<float>(), tensor_stats->size(1));
  *skipped.data_ptr<int64_t>() += ok ? 0 : 1;
  *step_ptr += 1;
  return std::string();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<ClipOptions>(m, "ClipOptions")
      .def(py::init([](int64_t scope, int64_t threshold, int64_t randomization, double level, double beta,
                       bool clip_update, bool check_finite, bool norms_needed, bool norms_given, bool apply,
                       std::vector<double> params, int64_t norm_kind, double norm_p) {
             ClipOptions o;
             o.norm_kind = norm_kind, o.norm_p = norm_p;
             o.scope = scope, o.threshold = threshold, o.randomization = randomization, o.level = level;
             o.beta = beta, o.params = std::move(params);
             o.clip_update = clip_update, o.check_finite = check_finite, o.norms_needed = norms_needed;
             o.norms_given = norms_given, o.apply = apply;
             return o;
           }),
           py::arg("scope"), py::arg("threshold"), py::arg("randomization"), py::arg("level"), py::arg("beta"),
           py::arg("clip_update"), py::arg("check_finite"), py::arg("norms_needed"), py::arg("norms_given") = false,
           py::arg("apply") = true, py::arg("params") = std::vector<double>(), py::arg("norm_kind") = 0,
           py::arg("norm_p") = 2.0)
      .def_readonly("params", &ClipOptions::params);
  py::class_<UpdateOptions>(m, "UpdateOptions")
      .def(py::init([](int64_t rule, double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                       bool maximize, bool stochastic_rounding, double beta1, double beta2, double eps, bool amsgrad) {
             return UpdateOptions{rule,    lr,       momentum,            dampening, weight_decay, nesterov,
                                  maximize, stochastic_rounding, beta1, beta2,        eps,      amsgrad};
           }),
           py::arg("rule"), py::arg("lr"), py::arg("momentum") = 0.0, py::arg("dampening") = 0.0,
           py::arg("weight_decay") = 0.0, py::arg("nesterov") = false, py::arg("maximize") = false,
           py::arg("stochastic_rounding") = false, py::arg("beta1") = 0.9, py::arg("beta2") = 0.999,
           py::arg("eps") = 1e-8, py::arg("amsgrad") = false)
      .def_readwrite("lr", &UpdateOptions::lr);
  // Errors come back as a message (empty on success) rather than as a C++ exception through pybind11:
  // on torch 2.11 an exception leaving this module killed the process (docs/first-gpu-findings.md,
  // "A C++ error that killed the process on torch 2.11").  Every check runs before the parallel regions, so no
  // exception is thrown inside one.
  m.def("clipped_sgd_step",
        [](std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> first_moments,
           std::vector<int64_t> columns, std::vector<int64_t> offsets, int64_t seed, at::Tensor step,
           at::Tensor ready, at::Tensor stats, at::Tensor skipped, c10::optional<at::Tensor> grad_scale,
           c10::optional<at::Tensor> found_inf, c10::optional<at::Tensor> norms, const ClipOptions& clip,
           const UpdateOptions& update, c10::optional<at::Tensor> threshold_state,
           c10::optional<at::Tensor> threshold_count, c10::optional<at::Tensor> threshold_sorted,
           std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> max_exp_avg_sqs,
           c10::optional<at::Tensor> adam_steps, std::vector<int64_t> unit_offsets, std::vector<int64_t> index_inner,
           std::vector<int64_t> index_extra, c10::optional<at::Tensor> given_sums,
           c10::optional<at::Tensor> tensor_stats) -> std::string {
          try {
            return clipped_sgd_step(std::move(params), std::move(grads), std::move(first_moments), std::move(columns),
                                    std::move(offsets), seed, std::move(step), std::move(ready), std::move(stats),
                                    std::move(skipped), std::move(grad_scale), std::move(found_inf), std::move(norms),
                                    clip, update, std::move(threshold_state), std::move(threshold_count),
                                    std::move(threshold_sorted), std::move(exp_avg_sqs), std::move(max_exp_avg_sqs),
                                    std::move(adam_steps), std::move(unit_offsets), std::move(index_inner),
                                    std::move(index_extra), std::move(given_sums), std::move(tensor_stats));
          } catch (const c10::Error& e) {
            return e.what_without_backtrace();
          } catch (const std::exception& e) {
            return e.what();
          } catch (...) {
            return "clipped_sgd_step: unknown C++ exception";
          }
          return std::string();
        },
        "One fused ClippedSGD / ClippedAdamW step of one param group (CPU); returns an error message, empty on "
        "success",
        py::arg("params"), py::arg("grads"), py::arg("first_moments"), py::arg("columns"), py::arg("offsets"),
        py::arg("seed"), py::arg("step"), py::arg("ready"), py::arg("stats"), py::arg("skipped"),
        py::arg("grad_scale"), py::arg("found_inf"), py::arg("norms"), py::arg("clip"), py::arg("update"),
        py::arg("threshold_state") = py::none(), py::arg("threshold_count") = py::none(),
        py::arg("threshold_sorted") = py::none(), py::arg("exp_avg_sqs") = std::vector<at::Tensor>(),
        py::arg("max_exp_avg_sqs") = std::vector<at::Tensor>(), py::arg("adam_steps") = py::none(),
        py::arg("unit_offsets") = std::vector<int64_t>(), py::arg("index_inner") = std::vector<int64_t>(),
        py::arg("index_extra") = std::vector<int64_t>(), py::arg("given_sums") = py::none(),
        py::arg("tensor_stats") = py::none());
  m.def("refresh_grad_pointers", &refresh_grad_pointers,
        "Re-read a param group's gradient pointers for a cached plan; -1/-2 (unchanged/changed) or the bad index");
  m.def("philox_uniform", [](uint64_t key, uint64_t index) { return tcf::philox_uniform(key, index); },
        "tl.rand(key, index), for tests");
}
