// Fork-join on torch's own OpenMP runtime without compiling this extension with -fopenmp.
//
// at::parallel_for is header-inline and only forks when the *calling* translation unit is
// built with OpenMP; setup.py builds without it. Calling GOMP_parallel from the libgomp that
// libtorch_cpu already loaded reuses torch's worker threads, so no second thread pool spins
// against them on a small machine. If that runtime is not found (a torch built with another
// parallel backend), std::thread is used instead.
#include <dlfcn.h>

#include <thread>
#include <vector>

#include <ATen/Parallel.h>

#include "covariance_kernels.h"

namespace curvfast::cpu {
namespace {

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpInt = int (*)();

struct Gomp {
  GompParallel parallel = nullptr;
  OmpInt thread_num = nullptr;
  OmpInt num_threads = nullptr;
};

const Gomp& gomp() {
  static const Gomp g = [] {
    Gomp r;
    void* h = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (h == nullptr) return r;
    auto par = reinterpret_cast<GompParallel>(dlsym(h, "GOMP_parallel"));
    auto tn = reinterpret_cast<OmpInt>(dlsym(h, "omp_get_thread_num"));
    auto nt = reinterpret_cast<OmpInt>(dlsym(h, "omp_get_num_threads"));
    if (par && tn && nt) {
      r.parallel = par;
      r.thread_num = tn;
      r.num_threads = nt;
    }
    return r;
  }();
  return g;
}

struct Job {
  void (*fn)(void*, int, int);
  void* ctx;
};

void gomp_body(void* p) {
  const Gomp& g = gomp();
  auto* job = static_cast<Job*>(p);
  job->fn(job->ctx, g.thread_num(), g.num_threads());
}

}  // namespace

void run_parallel(int nthreads, void (*fn)(void* ctx, int tid, int nthreads), void* ctx) {
  if (nthreads <= 1 || at::in_parallel_region()) {
    fn(ctx, 0, 1);
    return;
  }
  const Gomp& g = gomp();
  Job job{fn, ctx};
  if (g.parallel != nullptr) {
    g.parallel(&gomp_body, &job, static_cast<unsigned>(nthreads), 0);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(nthreads - 1);
  for (int t = 1; t < nthreads; ++t) workers.emplace_back([&, t] { fn(ctx, t, nthreads); });
  fn(ctx, 0, nthreads);
  for (auto& w : workers) w.join();
}

}  // namespace curvfast::cpu
