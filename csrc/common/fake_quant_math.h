// The fake-quant element map shared by every CPU path (and usable from CUDA device code).
// One map covers both ops (see eqkernels/ops/fake_quant.py):
//   v = x * inv_s; r = rne(clamp(v, lo, hi)); u = r + zr; q = clamp(u, qmin, qmax);
//   a = (floor((q - zr) * inv_step) + comp) * step;  y = a * s
//   in = qmin <= u <= qmax;  dx = in ? dy : 0;  t = in ? a - v : a;  o = in ? 0 : dy
// fake_quant: inv_step = step = 1, comp = 0 (a = q - zr). Layered: zr = 0, top-width range,
// inv_step = 2^-k, step = 2^k, comp = c_k; every product is exact, so y = (q_b + c_k)(2^k s).
// A NaN v gives NaN y, dx, t and o (selected explicitly: min/max and conversions drop NaN).
// Clamps are written `bound > v ? bound : v` so they return exactly what x86 max_ps(bound, v)
// and min_ps(bound, v) return, signed zeros included.
#pragma once
#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define EQK_FQ_HD __host__ __device__
#else
#define EQK_FQ_HD
#endif

namespace eqk {

struct FqParams {
  float s, inv_s, zr;
  float lo, hi;  // clamp for v: one code beyond the grid, so the mask and in-range codes hold
  float qmin, qmax, inv_step, step, comp;
};

EQK_FQ_HD inline FqParams make_fq_params(float s, float inv_s, float zr, float qmin, float qmax,
                                        float inv_step, float step, float comp) {
  FqParams p;
  p.s = s;
  p.inv_s = inv_s;
  p.zr = zr;
  p.lo = qmin - zr - 1.0f;
  p.hi = qmax - zr + 1.0f;
  p.qmin = qmin;
  p.qmax = qmax;
  p.inv_step = inv_step;
  p.step = step;
  p.comp = comp;
  return p;
}

struct FqElement {
  float v, u, a;
  bool nan;
};

// nearbyint rounds half to even in the default floating-point environment.
EQK_FQ_HD inline FqElement fq_element(float x, const FqParams& p) {
  FqElement e;
  e.v = x * p.inv_s;
  e.nan = e.v != e.v;
  float vc = p.lo > e.v ? p.lo : e.v;
  vc = p.hi < vc ? p.hi : vc;
  const float r = std::nearbyint(vc);
  e.u = r + p.zr;
  float q = p.qmin > e.u ? p.qmin : e.u;
  q = p.qmax < q ? p.qmax : q;
  e.a = (std::floor((q - p.zr) * p.inv_step) + p.comp) * p.step;
  return e;
}

EQK_FQ_HD inline float fq_forward(float x, const FqParams& p) {
  const FqElement e = fq_element(x, p);
  return e.nan ? std::numeric_limits<float>::quiet_NaN() : e.a * p.s;
}

// Writes dx; returns the per-element scale term dy * t and the zero-point term o (the
// zero-point gradient is -s * sum(o)).
EQK_FQ_HD inline void fq_backward(float dy, float x, const FqParams& p, float& dx, float& st,
                                  float& so) {
  const FqElement e = fq_element(x, p);
  const bool in = (e.u >= p.qmin) && (e.u <= p.qmax);
  const float nanv = std::numeric_limits<float>::quiet_NaN();
  dx = e.nan ? nanv : (in ? dy : 0.0f);
  const float t = in ? e.a - e.v : e.a;
  st = e.nan ? nanv : dy * t;
  so = e.nan ? nanv : (in ? 0.0f : dy);
}

}  // namespace eqk
