// glip's GPU tracer: where a CUDA process's device time goes, kernel by kernel, without nsys.
//
// A CUPTI injection library (CUDA loads it into any process started with
// `CUDA_INJECTION64_PATH=.../libglip-trace.so`). It records every kernel, copy and memset and
// every driver API call, and between `cuProfilerStart` and `cuProfilerStop` (glip bench calls
// them around its timed iterations: `glip_kernels::cuda::profiler_range`) adds them up: device
// time per kernel name (count, total, mean), copies by direction, memsets, the host's time in
// each driver API function, and how much of the window the device was busy. Printed to stderr,
// or appended to the file `GLIP_TRACE_OUT` names; `GLIP_TRACE_TOP` kernels (default 40).
// Without a window (a program that never calls cuProfilerStart) it reports the whole run at exit.
//
// Built by scripts/gpu-pack.sh against the pinned CUPTI wheel (`cargo xtask cuda-env --cupti`)
// and carried with libcupti beside it; scripts/gpu-check.sh part `p` runs it.
#include <cupti.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Span {
  std::string name;  // kernel name, copy kind or API function
  uint64_t start, end;
  uint64_t bytes;
  int kind;  // 0 kernel, 1 memcpy, 2 memset, 3 driver API
};

std::mutex lock;
std::vector<Span> spans;
std::vector<std::pair<uint64_t, uint64_t>> windows;
uint64_t window_start = 0;
bool in_window = false;
bool reported = false;

#define CHECK(call)                                                              \
  do {                                                                           \
    CUptiResult r_ = (call);                                                     \
    if (r_ != CUPTI_SUCCESS) {                                                   \
      const char *s_ = nullptr;                                                  \
      cuptiGetResultString(r_, &s_);                                             \
      fprintf(stderr, "glip-trace: %s failed: %s\n", #call, s_ ? s_ : "?");     \
    }                                                                            \
  } while (0)

std::string demangle(const char *name) {
  if (!name) return "?";
  int status = 0;
  char *d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = (status == 0 && d) ? d : name;
  free(d);
  // One line per kernel: cut the parameter list, keep the template arguments short.
  auto paren = out.find('(');
  if (paren != std::string::npos && paren > 0) out.resize(paren);
  if (out.size() > 110) out = out.substr(0, 107) + "...";
  return out;
}

const char *copy_kind(uint8_t k) {
  switch (k) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "copy host->device";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "copy device->host";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "copy device->device";
    default: return "copy (other)";
  }
}

void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *size = 8 << 20;
  *buffer = static_cast<uint8_t *>(aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t *buffer, size_t, size_t valid) {
  CUpti_Activity *rec = nullptr;
  std::vector<Span> got;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL: {
        auto *k = reinterpret_cast<CUpti_ActivityKernel10 *>(rec);
        got.push_back({demangle(k->name), k->start, k->end, 0, 0});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        auto *m = reinterpret_cast<CUpti_ActivityMemcpy6 *>(rec);
        got.push_back({copy_kind(m->copyKind), m->start, m->end, m->bytes, 1});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        auto *m = reinterpret_cast<CUpti_ActivityMemset4 *>(rec);
        got.push_back({"memset", m->start, m->end, m->bytes, 2});
        break;
      }
      case CUPTI_ACTIVITY_KIND_DRIVER: {
        auto *a = reinterpret_cast<CUpti_ActivityAPI *>(rec);
        const char *name = nullptr;
        cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
        got.push_back({name ? name : "?", a->start, a->end, 0, 3});
        break;
      }
      default:
        break;
    }
  }
  free(buffer);
  std::lock_guard<std::mutex> g(lock);
  spans.insert(spans.end(), got.begin(), got.end());
}

struct Sum {
  uint64_t ns = 0, count = 0, bytes = 0;
};

void report() {
  std::vector<Span> all;
  std::vector<std::pair<uint64_t, uint64_t>> wins;
  {
    std::lock_guard<std::mutex> g(lock);
    all = spans;
    wins = windows;
  }
  bool whole = wins.empty();
  uint64_t total_window = 0;
  for (auto &w : wins) total_window += w.second - w.first;
  auto inside = [&](const Span &s) {
    if (whole) return true;
    for (auto &w : wins)
      if (s.start >= w.first && s.start < w.second) return true;
    return false;
  };
  std::map<std::string, Sum> kernels, copies, api;
  uint64_t kernel_ns = 0, kernel_count = 0, first = UINT64_MAX, last = 0;
  std::vector<std::pair<uint64_t, uint64_t>> busy;
  for (auto &s : all) {
    if (!inside(s)) continue;
    uint64_t d = s.end > s.start ? s.end - s.start : 0;
    if (s.kind == 3) {
      auto &a = api[s.name];
      a.ns += d, a.count++;
      continue;
    }
    auto &t = s.kind == 0 ? kernels[s.name] : copies[s.name];
    t.ns += d, t.count++, t.bytes += s.bytes;
    if (s.kind == 0) kernel_ns += d, kernel_count++;
    busy.push_back({s.start, s.end});
    first = std::min(first, s.start);
    last = std::max(last, s.end);
  }
  // The device's busy time: the union of its kernels, copies and memsets.
  std::sort(busy.begin(), busy.end());
  uint64_t busy_ns = 0, cur_s = 0, cur_e = 0;
  for (auto &b : busy) {
    if (b.first > cur_e) {
      busy_ns += cur_e - cur_s;
      cur_s = b.first, cur_e = b.second;
    } else {
      cur_e = std::max(cur_e, b.second);
    }
  }
  busy_ns += cur_e - cur_s;
  if (whole) total_window = last > first ? last - first : 0;

  FILE *out = stderr;
  const char *path = getenv("GLIP_TRACE_OUT");
  if (path && *path) {
    FILE *f = fopen(path, "a");
    if (f) out = f;
  }
  const char *label = getenv("GLIP_TRACE_LABEL");
  int top = 40;
  if (const char *t = getenv("GLIP_TRACE_TOP")) top = atoi(t);
  fprintf(out, "== glip-trace%s%s: %s %.3f ms; device busy %.3f ms (%.1f%%); %llu kernels, %.3f ms\n",
          label ? " " : "", label ? label : "", whole ? "whole run" : "window", total_window / 1e6,
          busy_ns / 1e6, total_window ? 100.0 * busy_ns / total_window : 0.0,
          (unsigned long long)kernel_count, kernel_ns / 1e6);
  std::vector<std::pair<std::string, Sum>> ks(kernels.begin(), kernels.end());
  std::sort(ks.begin(), ks.end(), [](auto &a, auto &b) { return a.second.ns > b.second.ns; });
  fprintf(out, "%10s %7s %9s %6s  %s\n", "total ms", "count", "mean us", "share", "kernel");
  int shown = 0;
  for (auto &k : ks) {
    if (shown++ >= top) break;
    fprintf(out, "%10.3f %7llu %9.2f %5.1f%%  %s\n", k.second.ns / 1e6,
            (unsigned long long)k.second.count, k.second.ns / 1e3 / k.second.count,
            kernel_ns ? 100.0 * k.second.ns / kernel_ns : 0.0, k.first.c_str());
  }
  if ((int)ks.size() > top) {
    Sum rest;
    for (size_t i = top; i < ks.size(); i++) rest.ns += ks[i].second.ns, rest.count += ks[i].second.count;
    fprintf(out, "%10.3f %7llu %9s %5.1f%%  (%zu other kernels)\n", rest.ns / 1e6,
            (unsigned long long)rest.count, "", kernel_ns ? 100.0 * rest.ns / kernel_ns : 0.0,
            ks.size() - top);
  }
  for (auto &c : copies)
    fprintf(out, "%10.3f %7llu %9.2f %6s  %s (%.1f MB)\n", c.second.ns / 1e6,
            (unsigned long long)c.second.count, c.second.ns / 1e3 / c.second.count, "",
            c.first.c_str(), c.second.bytes / 1e6);
  std::vector<std::pair<std::string, Sum>> as(api.begin(), api.end());
  std::sort(as.begin(), as.end(), [](auto &a, auto &b) { return a.second.ns > b.second.ns; });
  fprintf(out, "host time in driver calls:\n");
  shown = 0;
  for (auto &a : as) {
    if (shown++ >= 12) break;
    fprintf(out, "%10.3f %7llu %9.2f %6s  %s\n", a.second.ns / 1e6,
            (unsigned long long)a.second.count, a.second.ns / 1e3 / a.second.count, "",
            a.first.c_str());
  }
  if (out != stderr) fclose(out);
}

void CUPTIAPI on_api(void *, CUpti_CallbackDomain domain, CUpti_CallbackId cbid, const void *data) {
  if (domain != CUPTI_CB_DOMAIN_DRIVER_API) return;
  auto *info = static_cast<const CUpti_CallbackData *>(data);
  uint64_t now = 0;
  if (cbid == CUPTI_DRIVER_TRACE_CBID_cuProfilerStart && info->callbackSite == CUPTI_API_EXIT) {
    cuptiGetTimestamp(&now);
    std::lock_guard<std::mutex> g(lock);
    window_start = now, in_window = true;
  } else if (cbid == CUPTI_DRIVER_TRACE_CBID_cuProfilerStop &&
             info->callbackSite == CUPTI_API_ENTER) {
    cuptiGetTimestamp(&now);
    {
      std::lock_guard<std::mutex> g(lock);
      if (!in_window) return;
      windows.push_back({window_start, now});
      in_window = false;
    }
    CHECK(cuptiActivityFlushAll(1));
    report();
    {
      std::lock_guard<std::mutex> g(lock);
      spans.clear();
      windows.clear();
      reported = true;
    }
  }
}

void at_exit() {
  cuptiActivityFlushAll(1);
  bool done;
  {
    std::lock_guard<std::mutex> g(lock);
    done = reported;
  }
  if (!done) report();
}

}  // namespace

extern "C" int InitializeInjection(void) {
  CUpti_SubscriberHandle sub;
  CHECK(cuptiSubscribe(&sub, (CUpti_CallbackFunc)on_api, nullptr));
  CHECK(cuptiEnableCallback(1, sub, CUPTI_CB_DOMAIN_DRIVER_API,
                            CUPTI_DRIVER_TRACE_CBID_cuProfilerStart));
  CHECK(cuptiEnableCallback(1, sub, CUPTI_CB_DOMAIN_DRIVER_API,
                            CUPTI_DRIVER_TRACE_CBID_cuProfilerStop));
  CHECK(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed));
  CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL));
  CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY));
  CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET));
  CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER));
  atexit(at_exit);
  return 1;
}
