/// glibc's `mallopt` (declared in <malloc.h>, which the Glibc module does not export).
@_silgen_name("mallopt")
private func mallopt(_ parameter: Int32, _ value: Int32) -> Int32

/// Keeps freed large blocks in the heap for reuse instead of returning them to the kernel. Meta-training
/// allocates and frees tensors of tens of megabytes thousands of times a step; glibc serves those by
/// `mmap`, so every reuse would fault and zero fresh pages (measured: more system time than compute).
func reuseLargeAllocations() {
    #if os(Linux)
    let M_TRIM_THRESHOLD: Int32 = -1, M_MMAP_MAX: Int32 = -4   // <malloc.h>
    _ = mallopt(M_MMAP_MAX, 0)
    _ = mallopt(M_TRIM_THRESHOLD, Int32.max)
    #endif
}
