// ByteBuffer (packed.h): aligned, zeroed storage for packed weights, huge pages where it pays.
#include <cstdlib>
#include <cstring>
#include <new>

#include "packed.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pqk {

namespace {
constexpr size_t kHuge = size_t(2) << 20;
}

ByteBuffer& ByteBuffer::operator=(ByteBuffer&& o) noexcept {
  if (this != &o) {
    std::free(p_);
    p_ = o.p_; n_ = o.n_;
    o.p_ = nullptr; o.n_ = 0;
  }
  return *this;
}

ByteBuffer::~ByteBuffer() { std::free(p_); }

void ByteBuffer::assign_zero(size_t n) {
  std::free(p_);
  p_ = nullptr; n_ = 0;
  if (n == 0) return;
  const size_t align = n >= kHuge ? kHuge : 64;
  const size_t cap = (n + align - 1) / align * align;  // aligned_alloc wants a multiple
  void* p = std::aligned_alloc(align, cap);
  if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == kHuge) (void)madvise(p, cap, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  std::memset(p, 0, n);
  p_ = (uint8_t*)p; n_ = n;
}

}  // namespace pqk
