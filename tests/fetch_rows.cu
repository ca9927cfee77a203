// Checks, on the host, the dispatch's fetch (cuda/fetch_rows.cuh): the kernel that reads each row
// a device needs from its sources into the chunk's scratch rows, built as host C++ with a warp's
// lanes as fibers (tests/warp_lanes.h). Over random work lists (tokens with none, one or several
// of their K pairs here, pairs another device computes), chunks of the list's rows (all, a middle
// slice, one past the end), source ranges (all, the first, the last, none) and both vector widths
// (16-byte rows, and rows of 4-byte words only, each a width that leaves a warp's last batch part
// full), on the grids the launcher gives (fetch_blocks: a warp per token; one and three whole-SM
// blocks striding over the tokens) and one block striding over all: each pair in the chunk whose
// source is in the range holds its source's row at its scratch row, every other row keeps its
// poison, each source row with a pair in the chunk is read once and every other not at all (the
// loads are counted: the vectors are a type whose assignment from a source row counts it), and
// no source outside the range is read (its pointer is null). Prints each case and the number of
// errors; exits 1 on any.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "tests/warp_lanes.h"

#include "cuda/fetch_rows.cuh"

using namespace ccf::cuda;

namespace {

int errors = 0;

void expect(bool ok, const std::string& where, const char* what) {
  if (!ok && errors++ < 30) std::printf("  %s: %s\n", where.c_str(), what);
}

constexpr uint8_t kPoison = 0xab;

// The source rows of the case running, and how often each of their vectors was read.
const void* sources_begin = nullptr;
const void* sources_end = nullptr;
std::vector<int> reads;

// A vector of the fetch's loads (uint4 or uint32_t), counted where it is assigned from a source
// row: the kernel's one way to read one (`value[b] = src[v]`).
template <class Bits>
struct Counted {
  Bits bits;
  Counted& operator=(const Counted& other) {
    if (&other >= sources_begin && &other < sources_end)
      ++reads[&other - static_cast<const Counted*>(sources_begin)];
    bits = other.bits;
    return *this;
  }
};

// A grid of `blocks` blocks of kThreads, a warp at a time (no warp of the fetch waits on another).
template <class Vector, int kThreads>
void fetch(const FetchParams& p, int blocks, const std::string& where) {
  lanes::grid = dim3(blocks);
  const std::function<void()> kernel = [&] { fetch_rows<Vector, kThreads>(p); };
  for (int b = 0; b < blocks; ++b)
    for (int w = 0; w < kThreads / 32; ++w)
      expect(lanes::run_warp(make_uint3(b, 0, 0), w, kernel), where,
             "a warp's lanes part at a collective");
}

struct Shape {
  int D, T, K;
  int64_t row_bytes;
};

template <class Vector>
void check(const Shape& s, const char* name, std::mt19937& rng) {
  const int before = errors;
  const int64_t pairs = int64_t{s.D} * s.T * s.K;
  // The work list: about half the pairs here, on scratch rows in a random order.
  std::vector<int32_t> code(pairs), row(pairs, -1);
  for (int32_t& c : code) c = rng() % 2 ? static_cast<int32_t>(rng() % 64) : -1;
  const int64_t here = std::count_if(code.begin(), code.end(), [](int32_t c) { return c >= 0; });
  std::vector<int32_t> order(here);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  for (int64_t i = 0, n = 0; i < pairs; ++i)
    if (code[i] >= 0) row[i] = order[n++];

  // Each source's rows, random bytes, in Vectors so that they start where the kernel's loads do.
  const int64_t vectors = s.row_bytes / sizeof(Vector), source_vectors = s.T * vectors;
  std::vector<Vector> all(s.D * source_vectors);
  for (uint8_t *b = reinterpret_cast<uint8_t*>(all.data()), *e = b + all.size() * sizeof(Vector);
       b < e; ++b)
    *b = static_cast<uint8_t>(rng());
  sources_begin = all.data();
  sources_end = all.data() + all.size();

  const int64_t chunks[][2] = {{0, here}, {here / 3, 2 * here / 3}, {here, here + 5}};
  const int ranges[][2] = {{0, s.D}, {0, 1}, {s.D - 1, s.D}, {1, 1}};
  for (const auto& [row_begin, row_end] : chunks) {
    for (const auto& [first, end] : ranges) {
      FetchParams p{};
      p.pairs = TokenPairs{code.data(), row.data(), s.D, s.T, s.K, row_begin, row_end};
      p.first_source = first;
      p.end_source = end;
      p.row_bytes = s.row_bytes;
      for (int d = 0; d < s.D; ++d)  // a source outside the range must not be read
        p.sources[d] = d >= first && d < end ? all.data() + d * source_vectors : nullptr;
      const int64_t tokens = int64_t{end - first} * s.T;
      const std::string where = std::string(name) + ", rows [" + std::to_string(row_begin) +
                                ", " + std::to_string(row_end) + "), sources [" +
                                std::to_string(first) + ", " + std::to_string(end) + ")";
      // Whether a (source, token) row has a pair of the launch, so is read and written.
      const auto launched = [&](int64_t i) {
        const int source = static_cast<int>(i / (int64_t{s.T} * s.K));
        return code[i] >= 0 && row[i] >= row_begin && row[i] < row_end && source >= first &&
               source < end;
      };
      // The launcher's grids (a warp per token; max_sms of 1 and 3 whole-SM blocks), and (-1)
      // one block of a warp per token's threads striding over every token.
      for (const int max_sms : {0, 1, 3, -1}) {
        std::vector<Vector> rows((row_end - row_begin) * vectors);
        std::memset(static_cast<void*>(rows.data()), kPoison, rows.size() * sizeof(Vector));
        p.rows = rows.data();
        p.max_sms = std::max(max_sms, 0);
        reads.assign(all.size(), 0);
        const std::string w = where + ", max_sms " + std::to_string(max_sms);
        if (tokens > 0 && max_sms > 0)
          fetch<Vector, kSmFetchThreads>(p, fetch_blocks(tokens, max_sms), w);
        else if (tokens > 0)
          fetch<Vector, kTokenThreads>(p, max_sms < 0 ? 1 : fetch_blocks(tokens, 0), w);

        std::vector<bool> written(row_end - row_begin, false), needed(s.D * s.T, false);
        for (int64_t i = 0; i < pairs; ++i) {
          if (!launched(i)) continue;
          needed[i / s.K] = true;
          written[row[i] - row_begin] = true;
          expect(std::memcmp(rows.data() + (row[i] - row_begin) * vectors,
                             all.data() + i / s.K * vectors, s.row_bytes) == 0,
                 w, "a pair's row is not its source's");
        }
        for (int64_t r = 0; r < row_end - row_begin; ++r) {
          if (written[r]) continue;
          const uint8_t* bytes = reinterpret_cast<const uint8_t*>(rows.data() + r * vectors);
          expect(std::all_of(bytes, bytes + s.row_bytes, [](uint8_t b) { return b == kPoison; }),
                 w, "a row written that holds no pair of the launch");
        }
        for (int64_t v = 0; v < static_cast<int64_t>(all.size()); ++v) {
          if (needed[v / vectors])
            expect(reads[v] == 1, w, "a source row with pairs here not read once");
          else
            expect(reads[v] == 0, w, "a source row read that no pair of the launch needs");
        }
      }
    }
  }
  std::printf("%s: %s\n", name, errors == before ? "ok" : "errors");
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  // 16-byte vectors: 37 a row (a warp's batch is 128), 8 sources, K = 8 (several pairs a token).
  check<Counted<uint4>>({8, 40, 8, 16 * 37}, "16-byte vectors, D=8, K=8", rng);
  // More tokens than one block's warps take at once, K = 1.
  check<Counted<uint4>>({2, 300, 1, 16 * 130}, "16-byte vectors, D=2, K=1", rng);
  // 4-byte words: a float32 row of H = 301 (not a multiple of 4).
  check<Counted<uint32_t>>({4, 50, 2, 4 * 301}, "4-byte words, D=4, K=2", rng);
  std::printf("errors: %d\n", errors);
  return errors ? 1 : 0;
}
