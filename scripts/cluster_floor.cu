// What a one-launch decode step synchronised by Hopper thread-block clusters could cost before it
// does any work: the floor under bench_decode's batch-1 row for a design the Triton kernels cannot
// express (Triton 3.6 has no cluster barrier or distributed shared memory in its language).
//
//     nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a scripts/cluster_floor.cu -o /tmp/cluster_floor
//     /tmp/cluster_floor            # on an H100 / H200; prints a markdown table
//
// Why: issue 3's batch-1 line needs the 64k step in <= 19.2 us against cuDNN's ~77 us on an H100.
// The step is four dependent phases (compressed pass over 10 MB of summaries -> scores and top-n
// -> attention over the chosen pages -> the split merge). As four launches linked by programmatic
// dependent launch their reads alone take 28.4 us (scripts/launch_floor.py, thirtieth round); as
// one launch with barriers in global memory 27.1 us (ticket barriers, thirty-first round). A
// cluster barrier (barrier.cluster.arrive.release / wait.acquire) is hardware, and a value handed
// to a neighbour through distributed shared memory needs no trip to the L2 — so a step whose kv
// group is one cluster (16 CTAs, the non-portable size; or 8) could pay much less per link.
//
// Every row is a CUDA graph replayed after an L2 flush written by cudaMemsetAsync (as
// triton.testing.do_bench's flush: a write of 256 MB), timed by events around the replay; the
// median of 200 after 20 warm-ups. Reads are of a 1 GB buffer of random bytes (never zeros); a
// link's read address depends on a value the previous link produced in another CTA, so links are
// truly dependent. "tile" = one 40 KB tile a CTA (64 rows x 320 bf16: one page's K and V of the
// paper shape); "pass" = the first link reads 10.5 MB (4096 summaries x 4 kv groups x 640 B, the
// 64k compressed pass) spread over the launch's CTAs. The last table (fifty-sixth session) asks what
// the earlier rows left open: in the step only the attention phase reads pages; the score and merge
// phases gather a few KB that the cluster's CTAs hold, which a cluster can hand over through
// distributed shared memory (and which Triton 3.9's Gluon can express: cluster barrier, cga layouts).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

namespace cg = cooperative_groups;

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

constexpr int kThreads = 256;
constexpr size_t kTileBytes = 40960;         // 64 x 320 bf16
constexpr size_t kPassBytes = 4096ull * 4 * 640;  // 10.5 MB of summaries
constexpr size_t kBufBytes = 1ull << 30;
constexpr size_t kTiles = kBufBytes / kTileBytes;

constexpr int kBatch = 10;  // 10 x 16 B x 256 threads = 40 KB (one tile) in flight a CTA
constexpr size_t kBatchBytes = (size_t)kBatch * kThreads * 16;

// Reads `bytes` (a multiple of kBatchBytes) from p with 40 KB a CTA always in flight: cp.async
// into shared memory in two halves, the next half issued as soon as one is consumed (plain loads
// let ptxas consume each before issuing the next few, halving the bytes in flight). Returns a
// value that depends on every byte read.
__device__ __forceinline__ unsigned read_span(const uint4* __restrict__ p, size_t bytes) {
  constexpr int kHalf = kBatch / 2;
  __shared__ uint4 stage[2][kHalf * kThreads];
  const size_t halves = bytes / (kBatchBytes / 2);
  auto issue = [&](size_t h) {
#pragma unroll
    for (int j = 0; j < kHalf; ++j) {
      unsigned dst = (unsigned)__cvta_generic_to_shared(&stage[h & 1][j * kThreads + threadIdx.x]);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst),
                   "l"(p + (h * kHalf + j) * kThreads + threadIdx.x) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  issue(0);
  issue(1);  // bytes hold at least one batch = two halves
  unsigned acc = 0;
  for (size_t h = 0; h < halves; ++h) {
    asm volatile("cp.async.wait_group 1;" ::: "memory");  // half h has landed
#pragma unroll
    for (int j = 0; j < kHalf; ++j) {
      uint4 v = stage[h & 1][j * kThreads + threadIdx.x];  // this thread's own copies: no barrier
      acc ^= v.x + v.y * 3u + v.z * 5u + v.w * 7u;
    }
    if (h + 2 < halves) issue(h + 2);
    else asm volatile("cp.async.commit_group;" ::: "memory");  // an empty group keeps the count
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  return acc;
}

// The first link's share of the pass a CTA (whole batches; 10.5 MB rounded up over n CTAs).
__device__ __forceinline__ size_t pass_share(unsigned n) {
  return (kPassBytes / n + kBatchBytes - 1) / kBatchBytes * kBatchBytes;
}

__device__ __forceinline__ unsigned block_xor(unsigned v) {
  __shared__ unsigned red;
  if (threadIdx.x == 0) red = 0;
  __syncthreads();
  atomicXor(&red, v);
  __syncthreads();
  unsigned r = red;
  __syncthreads();
  return r;
}

__device__ __forceinline__ size_t tile_of(unsigned cta, unsigned link, unsigned dep) {
  return ((size_t)cta * 7919u + link * 1009u + (dep & 0xff)) % kTiles;
}

// One link of a launch chain: wait for the previous launch (PDL), read (the pass or one tile at an
// address that depends on the previous link's output), let the next launch in at entry, write.
__global__ void __launch_bounds__(kThreads) chain_link(const uint4* __restrict__ src, unsigned* __restrict__ io,
                                                       unsigned link, int pass, int pdl) {
  if (pdl) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  unsigned cta = blockIdx.x, n = gridDim.x;
  unsigned acc;
  if (pass) {
    acc = read_span(src + cta * pass_share(n) / 16, pass_share(n));
  } else {
    unsigned dep = __ldcg(io + (cta + 1) % n);  // a neighbour's result from the previous link
    acc = read_span(src + tile_of(cta, link, dep) * (kTileBytes / 16), kTileBytes);
  }
  acc = block_xor(acc);
  if (threadIdx.x == 0) io[cta] = acc;
}

// The whole chain in one launch of clusters: after each link every CTA hands its result to its
// neighbour in the cluster through distributed shared memory and the cluster waits at its barrier.
__global__ void __launch_bounds__(kThreads) cluster_chain(const uint4* __restrict__ src, unsigned* __restrict__ out,
                                                          int links, int pass) {
  __shared__ unsigned from_left[2];  // by link parity: a neighbour writes link k+1's only after
                                     // the barrier that follows this CTA's read of link k-1's
  cg::cluster_group cluster = cg::this_cluster();
  // A CTA may write into another's shared memory only once that one has started: arrive now,
  // wait just before the first write (the first read overlaps the wait).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  unsigned rank = cluster.block_rank(), csize = cluster.num_blocks();
  unsigned cta = blockIdx.x, n = gridDim.x;
  unsigned dep = 0, acc = 0;
  for (int link = 0; link < links; ++link) {
    if (link == 0 && pass) {
      acc = read_span(src + cta * pass_share(n) / 16, pass_share(n));
    } else {
      acc = read_span(src + tile_of(cta, link, dep) * (kTileBytes / 16), kTileBytes);
    }
    acc = block_xor(acc);
    if (link == 0) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    if (link + 1 < links) {
      if (threadIdx.x == 0) *cluster.map_shared_rank(&from_left[link & 1], (rank + 1) % csize) = acc;
      cluster.sync();
      dep = from_left[link & 1];
    }
  }
  if (threadIdx.x == 0) out[cta] = acc;
}

// A step as a string of ops in one launch of clusters, each CTA running the same string: 'P' reads
// the CTA's share of the 10.5 MB pass (first op only), 'T' one 40 KB tile at an address that
// depends on the last exchange, 'X' an exchange through distributed shared memory — every CTA
// writes 8 KB into its own shared memory, the cluster waits at its barrier, and every CTA gathers
// 8 KB spread over all the cluster's CTAs (as a score phase gathers its group's partial scores or
// a merge its partial outputs) and folds it over the block. "PXTX" is the decode step's shape
// with no arithmetic: pass, scores to top-n, the chosen pages, the merge.
constexpr int kXchgU4 = 8192 / 16 / kThreads;  // 8 KB: two uint4 a thread
constexpr int kMaxOps = 8;
struct Ops { char op[kMaxOps]; int n; };

__global__ void __launch_bounds__(kThreads) cluster_step(const uint4* __restrict__ src, unsigned* __restrict__ out,
                                                         Ops ops) {
  extern __shared__ uint4 xchg[];  // [2][kXchgU4 * kThreads], by exchange parity: a CTA rewrites
                                   // a buffer only after the barrier that follows everyone's
                                   // gather from it
  cg::cluster_group cluster = cg::this_cluster();
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");  // see cluster_chain
  bool waited = false;
  unsigned rank = cluster.block_rank(), csize = cluster.num_blocks();
  unsigned cta = blockIdx.x, n = gridDim.x, tid = threadIdx.x;
  unsigned dep = 0, acc = 0;
  int x = 0;
  for (int i = 0; i < ops.n; ++i) {
    char op = ops.op[i];
    if (op == 'P') {
      acc ^= block_xor(read_span(src + cta * pass_share(n) / 16, pass_share(n)));
    } else if (op == 'T') {
      acc ^= block_xor(read_span(src + tile_of(cta, i, dep) * (kTileBytes / 16), kTileBytes));
    } else {  // 'X'
      uint4* mine = xchg + (x & 1) * kXchgU4 * kThreads;
#pragma unroll
      for (int j = 0; j < kXchgU4; ++j) mine[j * kThreads + tid] = make_uint4(acc, acc + tid, acc ^ j, rank);
      if (!waited) {
        asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
        waited = true;
      }
      cluster.sync();
      unsigned d = 0;
#pragma unroll
      for (int j = 0; j < kXchgU4; ++j) {
        const uint4* remote = cluster.map_shared_rank(mine, (rank + 1 + tid + j) % csize);
        uint4 v = remote[j * kThreads + tid];
        d ^= v.x + v.y * 3u + v.z * 5u + v.w * 7u;
      }
      dep = block_xor(d);
      acc ^= dep;
      ++x;
    }
  }
  // No CTA may leave while another still reads its shared memory.
  if (!waited) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  else cluster.sync();
  if (threadIdx.x == 0) out[cta] = acc;
}

__global__ void empty_link(unsigned* io) {
  if (threadIdx.x == 0) io[blockIdx.x] = blockIdx.x;
}

struct Bench {
  void* flush;
  cudaStream_t stream;
  template <class F>
  float graph_us(F&& launch) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    launch();  // once eagerly: errors surface here, not inside capture
    CK(cudaStreamSynchronize(stream));
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    launch();
    CK(cudaStreamEndCapture(stream, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    const int warm = 20, reps = 200;
    std::vector<cudaEvent_t> a(reps), b(reps);
    for (int i = 0; i < reps; ++i) {
      CK(cudaEventCreate(&a[i]));
      CK(cudaEventCreate(&b[i]));
    }
    for (int i = 0; i < warm; ++i) CK(cudaGraphLaunch(ge, stream));
    for (int i = 0; i < reps; ++i) {
      CK(cudaMemsetAsync(flush, 0, 256u << 20, stream));
      CK(cudaEventRecord(a[i], stream));
      CK(cudaGraphLaunch(ge, stream));
      CK(cudaEventRecord(b[i], stream));
    }
    CK(cudaStreamSynchronize(stream));
    std::vector<float> t(reps);
    for (int i = 0; i < reps; ++i) {
      CK(cudaEventElapsedTime(&t[i], a[i], b[i]));
      CK(cudaEventDestroy(a[i]));
      CK(cudaEventDestroy(b[i]));
    }
    std::nth_element(t.begin(), t.begin() + reps / 2, t.end());
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return t[reps / 2] * 1000.f;
  }
};

// A launch of `ctas` CTAs of kThreads on `stream` with one attribute (PDL or a cluster size);
// `attr` must outlive the launch.
static cudaLaunchConfig_t launch_config(int ctas, cudaStream_t stream, cudaLaunchAttribute* attr, int pdl,
                                        int csize) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(ctas);
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  if (csize > 0) {
    attr->id = cudaLaunchAttributeClusterDimension;
    attr->val.clusterDim.x = csize;
    attr->val.clusterDim.y = 1;
    attr->val.clusterDim.z = 1;
  } else {
    attr->id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr->val.programmaticStreamSerializationAllowed = pdl;
  }
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  int sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
  uint4* src;
  unsigned* io;
  Bench b;
  CK(cudaMalloc(&src, kBufBytes));
  CK(cudaMalloc(&io, 4096 * sizeof(unsigned)));
  CK(cudaMemset(io, 0, 4096 * sizeof(unsigned)));
  CK(cudaMalloc(&b.flush, 256u << 20));
  {  // random bytes: a host LCG, copied once
    std::vector<unsigned> h(kBufBytes / 4);
    unsigned s = 12345;
    for (auto& x : h) x = s = s * 1664525u + 1013904223u;
    CK(cudaMemcpy(src, h.data(), kBufBytes, cudaMemcpyHostToDevice));
  }
  CK(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));
  CK(cudaFuncSetAttribute(cluster_chain, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));

  auto chain = [&](int links, int pass, int pdl, int ctas) {
    return b.graph_us([&] {
      for (int i = 0; i < links; ++i) {
        cudaLaunchAttribute attr;
        cudaLaunchConfig_t cfg = launch_config(ctas, b.stream, &attr, pdl, 0);
        CK(cudaLaunchKernelEx(&cfg, chain_link, (const uint4*)src, io, (unsigned)i, (int)(pass && i == 0), pdl));
      }
    });
  };
  auto clusters = [&](int links, int pass, int csize, int ctas) {
    return b.graph_us([&] {
      cudaLaunchAttribute attr;
      cudaLaunchConfig_t cfg = launch_config(ctas, b.stream, &attr, 0, csize);
      CK(cudaLaunchKernelEx(&cfg, cluster_chain, (const uint4*)src, io + 2048, links, pass));
    });
  };
  int max_clusters[17] = {};
  for (int csize : {8, 16}) {  // how many clusters of this size can be resident at once
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t cfg = launch_config(csize * 16, nullptr, &attr, 0, csize);
    int n = 0;
    cudaError_t e = cudaOccupancyMaxActiveClusters(&n, cluster_chain, &cfg);
    if (e != cudaSuccess) (void)cudaGetLastError();
    max_clusters[csize] = e == cudaSuccess ? n : 0;
    std::printf("clusters of %d CTAs resident at once: %d (%s)\n", csize, n, cudaGetErrorString(e));
  }

  std::printf("\ngraph us (median of 200, L2 flushed by a 256 MB memset before each replay)\n");
  std::printf("| first link | design | CTAs | links: 1 | 2 | 3 | 4 |\n|---|---|---|---|---|---|---|\n");
  for (int pass : {0, 1}) {
    const char* first = pass ? "pass (10.5 MB)" : "tile";
    struct Row { const char* what; int kind; int arg; int ctas; };
    std::vector<Row> rows = {
        {"launch chain, stream order", 0, 0, sms},
        {"launch chain, PDL (next let in at entry)", 0, 1, sms},
        {"launch chain, PDL", 0, 1, 64},
        {"one launch, clusters of 8, DSMEM + cluster barrier", 1, 8, 64},
        {"one launch, clusters of 8, DSMEM + cluster barrier", 1, 8, 128},
        {"one launch, clusters of 16, DSMEM + cluster barrier", 1, 16, 64},
        {"one launch, clusters of 16, DSMEM + cluster barrier", 1, 16, 128},
    };
    for (auto& r : rows) {
      if (r.kind == 1 && max_clusters[r.arg] == 0) continue;  // this size cannot launch here
      std::printf("| %s | %s | %d |", first, r.what, r.ctas);
      for (int links = 1; links <= 4; ++links) {
        float us = r.kind == 0 ? chain(links, pass, r.arg, r.ctas) : clusters(links, pass, r.arg, r.ctas);
        std::printf(" %.1f |", us);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  // The step's shape with exchanges that read distributed shared memory instead of a tile.
  const int xchg_smem = 2 * kXchgU4 * kThreads * 16;
  CK(cudaFuncSetAttribute(cluster_step, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CK(cudaFuncSetAttribute(cluster_step, cudaFuncAttributeMaxDynamicSharedMemorySize, xchg_smem));
  auto step = [&](const char* s, int csize, int ctas) {
    Ops ops = {};
    ops.n = (int)std::strlen(s);
    std::memcpy(ops.op, s, ops.n);
    return b.graph_us([&] {
      cudaLaunchAttribute attr;
      cudaLaunchConfig_t cfg = launch_config(ctas, b.stream, &attr, 0, csize);
      cfg.dynamicSmemBytes = xchg_smem;
      CK(cudaLaunchKernelEx(&cfg, cluster_step, (const uint4*)src, io + 2048, ops));
    });
  };
  std::printf("\none launch of clusters, ops: P = the pass, T = a dependent 40 KB tile, "
              "X = an 8 KB exchange through distributed shared memory\n");
  std::printf("| cluster | CTAs | P | PX | PXX | PXT | PXTX | PXXTX |\n|---|---|---|---|---|---|---|---|\n");
  for (auto [csize, ctas] : {std::pair{8, 64}, std::pair{16, 64}, std::pair{8, 128}}) {
    if (max_clusters[csize] == 0) continue;
    std::printf("| %d | %d |", csize, ctas);
    for (const char* s : {"P", "PX", "PXX", "PXT", "PXTX", "PXXTX"}) std::printf(" %.1f |", step(s, csize, ctas));
    std::printf("\n");
    std::fflush(stdout);
  }
  // An empty graph's floor: one launch that does nothing but write.
  std::printf("\none launch, no read (%d CTAs): %.1f us\n", sms, b.graph_us([&] {
    empty_link<<<sms, kThreads, 0, b.stream>>>(io);
  }));
  return 0;
}
