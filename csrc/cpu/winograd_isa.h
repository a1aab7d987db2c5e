// What the Winograd driver (csrc/cpu/conv3x3_winograd.cpp, built for the baseline x86-64 ISA) and its
// per-ISA kernels (csrc/cpu/isa/winograd_<isa>.cpp) share: the problem's geometry, one task's
// arguments, and the per-ISA entry points. Plain data and its arithmetic only: no ISA-specific code is
// in this header.
#pragma once

#include <algorithm>
#include <cstdint>

namespace hrnet_fast {

constexpr int kMr = 6;   // micro-kernel rows (tiles)
constexpr int kNr = 16;  // micro-kernel columns (output channels): two vectors

// cin/cout: the conv's channels; cinp: V's row length (vectors of 8; the GEMM reads the first cin);
// coutp: the GEMM's N, padded to whole 16-wide panels with the transformed weight's zero columns.
struct WinogradGeometry {
  int64_t n, h, w, cin, cout, cinp, coutp, tiles_h, tiles_w, tiles;
};

// The lines of a dense weight that the GEMMs prefetch while they run: `rows` rows from `start`,
// row_bytes apart, each `lines` 64-byte lines line_bytes apart.
struct WeightLines {
  const char* start;
  int64_t rows, row_bytes;
  int lines;
  int64_t line_bytes;
};

// A dense 3x3 weight as the kernels read it: its data, and where the value of (input channel ci, 16-wide
// output panel j, tap k, output channel o of the panel) lies, ci * ci + j * j + k * k + o * o floats in.
// OIHW [C_out][C_in][3][3], contiguous (o == 9 * C_in): the layout a folded weight and state_dict have,
// read in place, a panel being 16 sequential streams (one an output channel), transposed in blocks of
// channels as they are read. IHWO [C_in][3][3][C_out] (o == 1), where a panel's 16 channels are one
// 64-byte line and its lines lie C_out floats apart, and panel-major [ceil(C_out/16)][C_in][3][3][16]
// (o == 1, output channels past C_out zero), a panel's lines one sequential stream.
struct DenseWeight {
  const float* data;
  int64_t ci, j, k, o;
  static DenseWeight oihw(const float* w, int64_t cin) { return {w, 9, kNr * 9 * cin, 1, 9 * cin}; }
  static DenseWeight ihwo(const float* w, int64_t cout) { return {w, 9 * cout, kNr, cout, 1}; }
  static DenseWeight panel_major(const float* w, int64_t cin) { return {w, 9 * kNr, cin * 9 * kNr, kNr, 1}; }
  // Output channels a line (o == 1) or a row each (OIHW).
  bool lines_hold_panels() const { return o == 1; }
  // The lines of panels [j0, j0 + panels) and input channels [c0, c0 + kn): IHWO and panel-major a row a
  // (channel, tap), its panels' lines j floats apart; OIHW a row an output channel (those of `cout`), its
  // run of 9 * kn floats.
  WeightLines lines_of(int64_t j0, int64_t panels, int64_t c0, int64_t kn, int64_t cout) const {
    const float* at = data + c0 * ci + j0 * j;
    if (lines_hold_panels())
      return {reinterpret_cast<const char*>(at), 9 * kn, k * 4, static_cast<int>(panels), j * 4};
    const int64_t outputs = std::max<int64_t>(0, std::min(panels * kNr, cout - j0 * kNr));
    // a run not aligned to a line may reach into one more
    return {reinterpret_cast<const char*>(at), outputs, o * 4, static_cast<int>((9 * kn * 4 + 63) / 64 + 1), 64};
  }
};

// One task of the driver's split: tiles [t0, t0 + nt) (ntp: nt rounded up to kMr), output panels
// [j0, j1) of 16 channels, with the calling thread's V and Mt scratch. The weight is either the packed
// transformed U (positions u_stride floats apart), or (u null) the dense weight w, each panel
// transformed into ubuf ([K*K][cin][16]) as the task reaches it.
struct WinogradTask {
  const float* x;
  const float* u;
  int64_t u_stride;  // floats between u's positions
  DenseWeight w;  // a dense weight (data null where u is given)
  float* ubuf;
  const float* bias;
  const float* residual;
  bool relu;
  const WinogradGeometry* g;
  float* y;
  float* vbuf;
  float* mbuf;
  int64_t t0, nt, ntp, j0, j1;
  int64_t slice;  // a dense weight's input channels transformed at a time (per ubuf), C_in for all at once
  int group;      // 16-wide panels a GEMM call takes at most (and ubuf holds a slice of): 1, 2 or 4
};

using WinogradTaskFn = void (*)(const WinogradTask&);

// Floats between the K*K position planes of the kernel's scratch buffers (V, Mt, a U panel, a whole U
// transformed on the call), for planes of `floats` each: one cache line more. The transforms write
// (or read) one line in every plane per tile or channel, and planes are mostly a multiple of 4 KiB
// (64 channels x 16 tiles, ...): packed back to back, all K*K lines of a tile fall into one L1 set
// and evict each other. Unpadded, transforming W32's 64-channel weights on each call took 2.3x as
// long as the whole convolution with them transformed ahead.
constexpr int64_t plane_stride(int64_t floats) { return floats + 16; }
// The filter transform of input channels [ci0, ci1): (w, cin, cout, ci0, ci1, u, us), positions us
// floats apart in u.
using WinogradWeightFn = void (*)(const DenseWeight&, int64_t, int64_t, int64_t, int64_t, float*, int64_t);

// A direct convolution in NHWC (conv_gemm_core.h): x [n][h][w][cin] -> y [n][ho][wo][cout], a kh x kw
// window at `stride` with `pad` zeros on every side. x_planar: x is [n][cin][h][w] instead (read by
// conv_few_cin_rows only: a model's input image); y_planar: y is [n][cout][ho][wo] (a model's output).
struct ConvGemmGeometry {
  int64_t n, h, w, cin, ho, wo, cout, kh, kw, stride, pad;
  bool x_planar = false, y_planar = false;
};

// Output channels [c0, c1) of a conv written to an output of their own, [n][ho][wo][c1 - c0], with its
// own residual (or null) and ReLU (conv_bias_act_split); c0 a multiple of kNr.
struct ConvGemmSegment {
  int64_t c0, c1;
  float* y;
  const float* residual;
  bool relu;
};

// Output rows (pixels) [r0, r1) of y = act(conv(x, W) + bias + residual): W as rows [kh][kw][cin] of
// ldw floats (ldw >= C_out rounded up to 16; the columns past C_out are read, not stored); abuf and
// cbuf the calling thread's kMr x (kh * kw * cin) floats for gathered windows and kMr x (C_out rounded
// up to 16) for the GEMM's output.
struct ConvGemmTask {
  const ConvGemmGeometry* g;
  const float* x;
  const float* w;
  int64_t ldw;
  const float* bias;
  const float* residual;
  float* y;
  float* abuf;
  float* cbuf;
  int64_t r0, r1;
  bool relu;
  int64_t j0 = 0, j1 = 0;  // conv_gemm_cols: the task's 16-wide output panels
  int64_t k0 = 0, k1 = 0;  // and its rows of the weight
  // conv_gemm_rows: the outputs, where the conv's channels go to several (y, residual, relu unused)
  const ConvGemmSegment* segs = nullptr;
  int64_t nsegs = 0;
};
using ConvGemmFn = void (*)(const ConvGemmTask&);

// seg_head (seg_head_core.h, csrc/cpu/seg_head.cpp): a low-res input's bilinear taps along one axis, for
// one output row or column: its two source rows (columns) as offsets in floats within an image (a row)
// of the input's projection, and their weights.
struct SegHeadTap {
  int64_t i0, i1;
  float l0, l1;
};
// A low-res input of seg_head: its projection conv1x1(lowres[k], weights[k]), NHWC [n][hk][wk][C] (C the
// base conv's output channels), `image` floats an image, and its taps for each output row and column.
struct SegHeadInput {
  const float* y;
  int64_t image;
  const SegHeadTap* rows;
  const SegHeadTap* cols;
};
// Low-res inputs a seg_head call takes at most (a segmentation HRNet has one to three).
constexpr int64_t kSegHeadMaxInputs = 8;
// Output pixels [r0, r1) of seg_head: g the base 1x1 conv (x [n][h][w][cin] -> C = g.cout channels, its
// weight w as rows [cin] of ldw floats, its bias), the inputs, the classifier (weight wc as rows [C] of
// ldwc floats, `classes` outputs, bias_c or null) into out, [n][h][w][classes] or planar
// [n][classes][h][w]; abuf, cbuf, obuf the calling thread's kMr x cin, kMr x C and kMr x classes floats
// (C and classes rounded up to 16).
struct SegHeadTask {
  const ConvGemmGeometry* g;
  const float* x;
  const float* w;
  int64_t ldw;
  const float* bias;
  const SegHeadInput* inputs;
  int64_t ninputs;
  const float* wc;
  int64_t ldwc;
  const float* bias_c;
  int64_t classes;
  float* out;
  bool out_planar;
  float* abuf;
  float* cbuf;
  float* obuf;
  int64_t r0, r1;
};
using SegHeadFn = void (*)(const SegHeadTask&);
// The convs conv_gemm takes: at least kConvGemmMinCin input channels and at most kConvGemmMaxK taps x
// input channels (K). Against oneDNN with its packed weight (2 threads, batch 1 and 8, 2026-11-27):
// W32's convs with K <= 576 (the fusions' strided 3x3 from 32 and 64 channels, the stem's second conv,
// stage 1's 1x1s) took 0.98-1.16x less time; past that, even with K split into L1-sized slices, oneDNN's
// blocked kernels were faster (K = 1152-2304: 0.88-0.95x; 720 -> 720 1x1: 0.88-0.97x), and on the
// stem's first conv (3 input channels: K = 27, each GEMM call too short for its 6 x 32 block) 0.83-0.90x
// (0.69-0.87x before a window's row of kW pixels was gathered in one copy).
constexpr int64_t kConvGemmMinCin = 8;
constexpr int64_t kConvGemmMaxK = 640;
// Groups of kMr pixels a block of conv_gemm_rows_blocked: the block's rows of x (96 x K floats, 24 KiB
// at K = 64) and one 64-column slice of the weight (16 KiB) stay in L1 together.
constexpr int64_t kConvGemmBlockGroups = 16;  // (a planar y: C of a whole block in the buffer)
// Convs with K past kConvGemmMaxK that conv_gemm still takes, at most kColsPixelsPerCout output pixels
// an output channel: weight-bound, run with the weight's rows read once as two streams
// (conv_gemm_cols_core.h). oneDNN's conv with its packed weight read it latency-bound: W32's 128 -> 256
// stride-2 convs (K = 1152) in the forward, 2 threads of an Intel Xeon, 282-291 against 167-179 us a
// call at batch 1 (48 pixels), 1184-1231 against 1014-1041 at batch 8 (384). Not for K within
// kConvGemmMaxK: conv_gemm_rows was level or faster there (the 64 -> 256 one at batch 8: 456 against 533).
constexpr int64_t kColsPixelsPerCout = 2;
// Fewer input channels than kConvGemmMinCin (an image's first conv): conv_few_cin_rows
// (conv_few_cin_core.h), which reads the windows in place, for windows of at most kFewCinMaxKh rows
// of kFewCinMaxRow floats (kW x C_in). W32's 3 -> 64 stride-2 stem conv in the forward, 2 threads of
// an Intel Xeon (each op timed in the forward, the two builds in turn): 0.21 ms at batch 1 against
// oneDNN's 0.43 with its separate ReLU pass, 3.7 against 5.3 at batch 8 (1.9 alone, its 25 MB output
// written to memory that the forward has not just used).
constexpr int64_t kFewCinMaxKh = 7;
constexpr int64_t kFewCinMaxRow = 64;

// The task functions of one instruction set, for F(2x2) and F(4x4), and their filter transforms.
struct WinogradKernels {
  WinogradTaskFn m2, m4;
  WinogradWeightFn w2, w4;
  int gemm_panels;  // 16-wide panels per GEMM call (2 where the GEMM is 16 lanes; 4 where U is whole: WinogradRunner)
  ConvGemmFn conv_gemm;
  ConvGemmFn conv_few_cin;  // ConvGemmTask's r0, r1: output rows of n x ho, not pixels
  ConvGemmFn conv_gemm_cols_gather, conv_gemm_cols, conv_gemm_cols_sum;  // weight-bound convs (conv_gemm_cols_core.h)
  SegHeadFn seg_head;  // the segmentation head (seg_head_core.h)
};

// One per csrc/cpu/isa/winograd_<isa>.cpp; null members where the build has no such variant
// (the AVX2 and AVX-512 ones exist on x86-64 only).
WinogradKernels winograd_kernels_base();
WinogradKernels winograd_kernels_avx2();
WinogradKernels winograd_kernels_avx512();

}  // namespace hrnet_fast
