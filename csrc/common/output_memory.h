// Output allocation of the CPU kernels. PyTorch's CPU allocator hands every fresh output new memory from
// malloc, which returns large blocks to the OS on free: the next call's output then costs one page fault and a
// zeroed 4 KiB page per 4 KiB on its first write. At FlowTok's training shapes that takes longer than the
// kernels themselves (a 64 MiB output: 16384 faults). So the outputs of our CPU kernels come from a small
// cache of recently freed blocks (reused as they are, already mapped), and new blocks of 4 MiB or more are
// advised onto transparent huge pages (512x fewer faults), as PyTorch's THP_MEM_ALLOC_ENABLE does for all
// tensors. Only blocks between 256 KiB and the cache limit are cached; the cache keeps at most
// TOKENFLOW_EXT_CPU_CACHE_MB MiB (default 512; 0 turns caching off) and frees the oldest blocks beyond it.
// TOKENFLOW_EXT_HUGE_PAGES=0 turns the huge-page advice off.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tokenflow_ext {

constexpr size_t kHugePageBytes = size_t(2) << 20;
constexpr size_t kHugePageMinBytes = size_t(4) << 20;
constexpr size_t kCachedMinBytes = size_t(256) << 10;

inline size_t env_megabytes(const char* name, size_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const unsigned long long parsed = std::strtoull(value, &end, 10);
  return end != nullptr && *end == '\0' ? static_cast<size_t>(parsed) << 20 : fallback;
}

// Recently freed output blocks, most recent last; thread-safe.
class OutputBlockCache {
 public:
  static OutputBlockCache& instance() {
    static auto* cache = new OutputBlockCache();  // never destroyed: tensors may be freed during exit
    return *cache;
  }

  size_t limit() const { return limit_; }

  // A cached block of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = blocks_.size(); i-- > 0;) {
      if (blocks_[i].second == bytes) {
        void* ptr = blocks_[i].first;
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(i));
        cached_bytes_ -= bytes;
        return ptr;
      }
    }
    return nullptr;
  }

  // Keep `ptr` for reuse, freeing the oldest blocks beyond the limit.
  void give(void* ptr, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.emplace_back(ptr, bytes);
      cached_bytes_ += bytes;
      size_t drop = 0;
      while (cached_bytes_ > limit_ && drop < blocks_.size()) {
        cached_bytes_ -= blocks_[drop].second;
        evicted.push_back(blocks_[drop].first);
        ++drop;
      }
      blocks_.erase(blocks_.begin(), blocks_.begin() + static_cast<std::ptrdiff_t>(drop));
    }
    for (void* block : evicted) std::free(block);
  }

  // Frees every cached block; returns the bytes released.
  size_t release() {
    std::vector<std::pair<void*, size_t>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(blocks_);
      cached_bytes_ = 0;
    }
    size_t bytes = 0;
    for (const auto& block : blocks) {
      std::free(block.first);
      bytes += block.second;
    }
    return bytes;
  }

 private:
  OutputBlockCache() : limit_(env_megabytes("TOKENFLOW_EXT_CPU_CACHE_MB", size_t(512) << 20)) {}

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t cached_bytes_ = 0;
  size_t limit_;
};

inline bool huge_page_advice_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("TOKENFLOW_EXT_HUGE_PAGES");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

// A cached output block: the memory and its (page-rounded) size, returned to the cache when the tensor dies.
struct OutputBlock {
  void* ptr;
  size_t bytes;
};

inline void return_output_block(void* context) {
  auto* block = static_cast<OutputBlock*>(context);
  OutputBlockCache::instance().give(block->ptr, block->bytes);
  delete block;
}

class CachedOutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (nbytes + 4095) & ~size_t(4095);
    void* ptr = OutputBlockCache::instance().take(bytes);
    if (ptr == nullptr) {
      const size_t alignment = bytes >= kHugePageMinBytes ? kHugePageBytes : 64;
      ptr = std::aligned_alloc(alignment, (bytes + alignment - 1) & ~(alignment - 1));
      if (ptr == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (bytes >= kHugePageMinBytes && huge_page_advice_enabled()) {
        madvise(ptr, bytes & ~(kHugePageBytes - 1), MADV_HUGEPAGE);  // advice only: failure is harmless
      }
#endif
    }
    return {ptr, new OutputBlock{ptr, bytes}, &return_output_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  static CachedOutputAllocator* get() {
    static CachedOutputAllocator allocator;
    return &allocator;
  }
};

// at::empty for a kernel's output: CPU outputs of 256 KiB up to the cache limit come from the block cache.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu() && !options.pinned_memory() && options.layout() == at::kStrided) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(options.dtype().toScalarType());
    const size_t limit = OutputBlockCache::instance().limit();
    if (bytes >= kCachedMinBytes && bytes <= limit) {
      return at::detail::empty_generic(sizes, CachedOutputAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       options.dtype().toScalarType(), c10::MemoryFormat::Contiguous);
    }
  }
  return at::empty(sizes, options);
}

inline at::Tensor empty_output_like(const at::Tensor& like) { return empty_output(like.sizes(), like.options()); }

}  // namespace tokenflow_ext
