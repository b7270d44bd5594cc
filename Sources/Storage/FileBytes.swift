import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A failed system call on a path, with the operation and `errno`.
public struct FileIOError: Error, CustomStringConvertible, Sendable, Equatable {
    public let operation: String
    public let path: String
    public let code: Int32

    public init(_ operation: String, _ path: String, code: Int32 = errno) {
        self.operation = operation
        self.path = path
        self.code = code
    }

    public var description: String {
        "\(operation) \(path): \(String(cString: strerror(code))) (errno \(code))"
    }
}

/// The read-only bytes of a whole file, held either as a memory map or as one heap buffer filled by
/// a single read loop. Freed (unmapped) with the object.
public final class FileBytes: @unchecked Sendable {
    public let baseAddress: UnsafeRawPointer?
    public let count: Int
    private let mapped: Bool
    private let owned: UnsafeMutableRawPointer?

    public var buffer: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: baseAddress, count: count) }

    /// Copies `data` into an owned buffer.
    public init(copying data: Data) {
        let n = data.count
        count = n
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(n, 1), alignment: 64)
        data.withUnsafeBytes { if let b = $0.baseAddress, n > 0 { p.copyMemory(from: b, byteCount: n) } }
        owned = p
        baseAddress = UnsafeRawPointer(p)
        mapped = false
    }

    private init(base: UnsafeRawPointer?, count: Int, mapped: Bool, owned: UnsafeMutableRawPointer?) {
        self.baseAddress = base
        self.count = count
        self.mapped = mapped
        self.owned = owned
    }

    deinit {
        if mapped, let base = baseAddress {
            munmap(UnsafeMutableRawPointer(mutating: base), count)
        } else if let owned {
            owned.deallocate()
        }
    }

    /// Opens `path` read-only and checks that it is a regular file; returns the descriptor and its size.
    static func openRegular(_ path: String) throws -> (Int32, Int) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FileIOError("open", path) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = FileIOError("stat", path)
            close(fd)
            throw e
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw FileIOError("open (not a regular file)", path, code: EINVAL)
        }
        return (fd, Int(st.st_size))
    }

    /// Reads the whole file with one read loop into a single buffer. `limit` caps the size accepted.
    public static func read(_ path: String, limit: Int = Int.max) throws -> FileBytes {
        let (fd, size) = try openRegular(path)
        defer { close(fd) }
        guard size <= limit else { throw FileIOError("read (file larger than \(limit) bytes)", path, code: EFBIG) }
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(size, 1), alignment: 64)
        var done = 0
        while done < size {
            let n = Glibc_read(fd, p + done, size - done)
            if n < 0 {
                if errno == EINTR { continue }
                let e = FileIOError("read", path)
                p.deallocate()
                throw e
            }
            if n == 0 {
                p.deallocate()
                throw FileIOError("read (file shrank while reading)", path, code: EIO)
            }
            done += n
        }
        return FileBytes(base: UnsafeRawPointer(p), count: size, mapped: false, owned: p)
    }

    /// Maps the whole file read-only (falls back to `read` for an empty file).
    public static func map(_ path: String) throws -> FileBytes {
        let (fd, size) = try openRegular(path)
        defer { close(fd) }
        if size == 0 { return FileBytes(base: nil, count: 0, mapped: false, owned: nil) }
        guard let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0),
              p != UnsafeMutableRawPointer(bitPattern: -1) else {
            throw FileIOError("mmap", path)
        }
        return FileBytes(base: UnsafeRawPointer(p), count: size, mapped: true, owned: nil)
    }
}

@inline(__always)
func Glibc_read(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int) -> Int {
    #if canImport(Glibc)
    return Glibc.read(fd, buffer, count)
    #else
    return Darwin.read(fd, buffer, count)
    #endif
}
