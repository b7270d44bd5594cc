import CArchive
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Why an archive could not be written, read or restored.
public enum ArchiveError: Error, CustomStringConvertible, Sendable {
    case libarchive(operation: String, message: String)
    /// An entry that restore refuses before extracting anything of it.
    case unsafeEntry(path: String, reason: String)
    /// Declared or actual sizes beyond the limits (an archive bomb).
    case tooLarge(path: String, reason: String)
    case invalidArchive(String)
    case hashMismatch(path: String, expected: String, actual: String)
    case conflict(path: String, reason: String)

    public var description: String {
        switch self {
        case .libarchive(let op, let message): return "libarchive: \(op): \(message)"
        case .unsafeEntry(let path, let reason): return "refused archive entry '\(path)': \(reason)"
        case .tooLarge(let path, let reason): return "refused archive entry '\(path)': \(reason)"
        case .invalidArchive(let reason): return "not a valid checkpoint archive: \(reason)"
        case .hashMismatch(let path, let expected, let actual):
            return "archive entry '\(path)': sha256 \(actual), expected \(expected)"
        case .conflict(let path, let reason): return "\(path): \(reason)"
        }
    }
}

/// File-type bits of libarchive entries (`AE_IF*`, which Swift does not import).
enum EntryType {
    static let mask: UInt32 = 0o170000
    static let regular: UInt32 = 0o100000
    static let directory: UInt32 = 0o040000
    static let symlink: UInt32 = 0o120000
}

private func archiveMessage(_ a: OpaquePointer?) -> String {
    guard let a, let s = archive_error_string(a) else { return "unknown error" }
    return String(cString: s)
}

/// Writes a tar archive (pax format) with libarchive, to a file or to a fixed-size memory buffer,
/// optionally through the zstd filter. Can write any entry kind, so tests also use it to build
/// hostile archives.
public final class TarArchiveWriter {
    public enum Compression: Sendable { case none, zstd(level: Int32) }

    private let archive: OpaquePointer
    private var memory: UnsafeMutableRawPointer?
    private var memoryCapacity = 0
    private let used: UnsafeMutablePointer<Int>
    private var closed = false
    private let mtime = time(nil)

    /// Writes to a file at `path` (created or truncated).
    public convenience init(path: String, compression: Compression) throws {
        try self.init(compression: compression)
        guard archive_write_open_filename(archive, path) == ARCHIVE_OK else {
            throw ArchiveError.libarchive(operation: "open \(path)", message: archiveMessage(archive))
        }
    }

    /// Writes into a memory buffer of `capacity` bytes; writing past it fails, and `writtenData`
    /// still returns what fit (a test can cut an archive short this way).
    public convenience init(memoryCapacity capacity: Int, compression: Compression) throws {
        try self.init(compression: compression)
        memory = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
        memoryCapacity = capacity
        guard archive_write_open_memory(archive, memory, capacity, used) == ARCHIVE_OK else {
            throw ArchiveError.libarchive(operation: "open memory", message: archiveMessage(archive))
        }
    }

    private init(compression: Compression) throws {
        guard let a = archive_write_new() else { throw ArchiveError.libarchive(operation: "archive_write_new", message: "out of memory") }
        archive = a
        used = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        used.initialize(to: 0)
        guard archive_write_set_format_pax_restricted(a) == ARCHIVE_OK else {
            throw ArchiveError.libarchive(operation: "pax format", message: archiveMessage(a))
        }
        if case .zstd(let level) = compression {
            guard archive_write_add_filter_zstd(a) == ARCHIVE_OK else {
                throw ArchiveError.libarchive(operation: "zstd filter", message: archiveMessage(a))
            }
            guard archive_write_set_filter_option(a, "zstd", "compression-level", "\(level)") >= ARCHIVE_WARN else {
                throw ArchiveError.libarchive(operation: "zstd level", message: archiveMessage(a))
            }
        }
    }

    deinit {
        if !closed { archive_write_close(archive) }
        archive_write_free(archive)
        memory?.deallocate()
        used.deallocate()
    }

    /// The bytes written so far to a memory buffer.
    public var writtenData: Data {
        guard let memory else { return Data() }
        return Data(bytes: memory, count: min(used.pointee, memoryCapacity))
    }

    private func writeHeader(_ path: String, type: UInt32, size: Int64, perm: UInt32,
                             symlink: String? = nil, hardlink: String? = nil) throws {
        guard let entry = archive_entry_new() else { throw ArchiveError.libarchive(operation: "entry", message: "out of memory") }
        defer { archive_entry_free(entry) }
        archive_entry_set_pathname(entry, path)
        archive_entry_set_filetype(entry, type)
        archive_entry_set_perm(entry, perm)
        archive_entry_set_size(entry, size)
        archive_entry_set_mtime(entry, mtime, 0)
        if let symlink { archive_entry_set_symlink(entry, symlink) }
        if let hardlink { archive_entry_set_hardlink(entry, hardlink) }
        guard archive_write_header(archive, entry) >= ARCHIVE_WARN else {
            throw ArchiveError.libarchive(operation: "write header \(path)", message: archiveMessage(archive))
        }
    }

    private func writeData(_ bytes: UnsafeRawBufferPointer, path: String) throws {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        var done = 0
        while done < bytes.count {
            let n = archive_write_data(archive, base + done, bytes.count - done)
            guard n > 0 else { throw ArchiveError.libarchive(operation: "write \(path)", message: archiveMessage(archive)) }
            done += n
        }
    }

    private func finishEntry(_ path: String) throws {
        guard archive_write_finish_entry(archive) >= ARCHIVE_WARN else {
            throw ArchiveError.libarchive(operation: "finish \(path)", message: archiveMessage(archive))
        }
    }

    /// A regular file holding `data`; `declaredSize` (for tests) puts another size in the header.
    public func addFile(_ path: String, data: Data, declaredSize: Int64? = nil, perm: UInt32 = 0o644) throws {
        try writeHeader(path, type: EntryType.regular, size: declaredSize ?? Int64(data.count), perm: perm)
        try data.withUnsafeBytes { try writeData($0, path: path) }
        try finishEntry(path)
    }

    /// A regular file copied from `source` in chunks; fails if the file changes size meanwhile.
    public func addFile(_ path: String, contentsOf source: String) throws {
        let (fd, size) = try storeIO { try FileBytes.openRegular(source) }
        defer { close(fd) }
        try writeHeader(path, type: EntryType.regular, size: Int64(size), perm: 0o644)
        let chunk = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 64)
        defer { chunk.deallocate() }
        var total = 0
        while true {
            let n = Glibc_read(fd, chunk, 1 << 20)
            if n < 0 {
                if errno == EINTR { continue }
                throw StoreError.io(FileIOError("read", source))
            }
            if n == 0 { break }
            total += n
            guard total <= size else { break }
            try writeData(UnsafeRawBufferPointer(start: chunk, count: n), path: path)
        }
        guard total == size else {
            throw ArchiveError.conflict(path: source, reason: "changed size while being archived")
        }
        try finishEntry(path)
    }

    public func addDirectory(_ path: String) throws {
        try writeHeader(path, type: EntryType.directory, size: 0, perm: 0o755)
        try finishEntry(path)
    }

    public func addSymlink(_ path: String, target: String) throws {
        try writeHeader(path, type: EntryType.symlink, size: 0, perm: 0o777, symlink: target)
        try finishEntry(path)
    }

    public func addHardlink(_ path: String, target: String) throws {
        try writeHeader(path, type: EntryType.regular, size: 0, perm: 0o644, hardlink: target)
        try finishEntry(path)
    }

    /// Ends the archive (flushes the zstd frame and the tar trailer).
    public func finish() throws {
        guard !closed else { return }
        closed = true
        guard archive_write_close(archive) == ARCHIVE_OK else {
            throw ArchiveError.libarchive(operation: "close", message: archiveMessage(archive))
        }
    }
}

/// Limits that a restore enforces while it reads an archive.
public struct ArchiveLimits: Sendable {
    /// Sum of all entries' sizes, declared and actually read.
    public var maxTotalBytes: Int64
    /// One entry's size.
    public var maxEntryBytes: Int64
    public var maxEntries: Int
    public var maxPathBytes: Int

    public init(maxTotalBytes: Int64 = 64 << 30, maxEntryBytes: Int64 = 32 << 30, maxEntries: Int = 1_000_000,
                maxPathBytes: Int = 1024) {
        self.maxTotalBytes = maxTotalBytes
        self.maxEntryBytes = maxEntryBytes
        self.maxEntries = maxEntries
        self.maxPathBytes = maxPathBytes
    }
}

/// Safe extraction of a tar archive (plain or zstd) into a folder.
enum SafeExtractor {
    /// `archive_write_disk` writes relative to the working directory, which is process-wide: one
    /// extraction at a time, and the working directory is restored afterwards.
    private static let workingDirectoryLock = NSLock()

    static let diskFlags: Int32 = ARCHIVE_EXTRACT_SECURE_SYMLINKS | ARCHIVE_EXTRACT_SECURE_NODOTDOT
        | ARCHIVE_EXTRACT_SECURE_NOABSOLUTEPATHS | ARCHIVE_EXTRACT_NO_OVERWRITE

    /// Checks one entry's path: relative, under `root`, no `.`/`..`/empty components, no NUL.
    static func checkPath(_ path: String, root: String, limits: ArchiveLimits) throws -> String {
        guard !path.isEmpty else { throw ArchiveError.unsafeEntry(path: path, reason: "empty path") }
        guard path.utf8.count <= limits.maxPathBytes else { throw ArchiveError.unsafeEntry(path: path, reason: "path too long") }
        guard !path.hasPrefix("/") else { throw ArchiveError.unsafeEntry(path: path, reason: "absolute path") }
        guard !path.contains("\\"), !path.unicodeScalars.contains(where: { $0.value < 0x20 }) else {
            throw ArchiveError.unsafeEntry(path: path, reason: "backslash or control character in the path")
        }
        var components = path.split(separator: "/", omittingEmptySubsequences: false)
        if components.count > 1, components.last == "" { components.removeLast() }
        for c in components {
            if c == ".." { throw ArchiveError.unsafeEntry(path: path, reason: "'..' component") }
            if c == "." || c.isEmpty { throw ArchiveError.unsafeEntry(path: path, reason: "empty or '.' component") }
        }
        guard components.first.map(String.init) == root else {
            throw ArchiveError.unsafeEntry(path: path, reason: "outside the '\(root)/' folder")
        }
        return components.joined(separator: "/")
    }

    /// The contents of the regular-file entry `name` (at most `limit` bytes), read into memory.
    static func readEntry(_ archivePath: String, named name: String, limit: Int) throws -> Data {
        guard let reader = archive_read_new() else { throw ArchiveError.libarchive(operation: "archive_read_new", message: "out of memory") }
        defer { archive_read_free(reader) }
        archive_read_support_filter_zstd(reader)
        archive_read_support_format_tar(reader)
        guard archive_read_open_filename(reader, archivePath, 1 << 16) == ARCHIVE_OK else {
            throw ArchiveError.libarchive(operation: "open \(archivePath)", message: archiveMessage(reader))
        }
        while true {
            var entry: OpaquePointer?
            let r = archive_read_next_header(reader, &entry)
            if r == ARCHIVE_EOF { throw ArchiveError.invalidArchive("no \(name)") }
            guard r >= ARCHIVE_WARN, let entry else {
                throw ArchiveError.libarchive(operation: "read header", message: archiveMessage(reader))
            }
            guard let p = archive_entry_pathname(entry), String(cString: p) == name else { continue }
            guard UInt32(archive_entry_filetype(entry)) & EntryType.mask == EntryType.regular, archive_entry_hardlink(entry) == nil else {
                throw ArchiveError.unsafeEntry(path: name, reason: "not a regular file")
            }
            guard archive_entry_size(entry) <= Int64(limit) else {
                throw ArchiveError.tooLarge(path: name, reason: "larger than \(limit) bytes")
            }
            var data = Data()
            let chunk = UnsafeMutableRawPointer.allocate(byteCount: 1 << 16, alignment: 16)
            defer { chunk.deallocate() }
            while true {
                let n = archive_read_data(reader, chunk, 1 << 16)
                guard n >= 0 else { throw ArchiveError.libarchive(operation: "read \(name)", message: archiveMessage(reader)) }
                if n == 0 { break }
                guard data.count + n <= limit else { throw ArchiveError.tooLarge(path: name, reason: "larger than \(limit) bytes") }
                data.append(chunk.assumingMemoryBound(to: UInt8.self), count: n)
            }
            return data
        }
    }

    /// Extracts `archivePath` into the existing empty folder `destination`, checking every entry
    /// before writing it: only regular files and folders under `root/`, no links, no `..`, no
    /// absolute paths, no repeats, sizes within `limits`. Returns the regular files written
    /// (relative paths).
    static func extract(_ archivePath: String, into destination: String, root: String, limits: ArchiveLimits) throws -> [String] {
        guard let reader = archive_read_new() else { throw ArchiveError.libarchive(operation: "archive_read_new", message: "out of memory") }
        defer { archive_read_free(reader) }
        archive_read_support_filter_zstd(reader)
        archive_read_support_format_tar(reader)
        guard archive_read_open_filename(reader, archivePath, 1 << 16) == ARCHIVE_OK else {
            throw ArchiveError.libarchive(operation: "open \(archivePath)", message: archiveMessage(reader))
        }
        guard let writer = archive_write_disk_new() else { throw ArchiveError.libarchive(operation: "archive_write_disk_new", message: "out of memory") }
        defer { archive_write_free(writer) }
        archive_write_disk_set_options(writer, diskFlags)

        workingDirectoryLock.lock()
        defer { workingDirectoryLock.unlock() }
        let saved = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard saved >= 0 else { throw StoreError.io(FileIOError("open working directory", ".")) }
        defer {
            _ = fchdir(saved)
            close(saved)
        }
        guard chdir(destination) == 0 else { throw StoreError.io(FileIOError("chdir", destination)) }

        var seen = Set<String>()
        var files: [String] = []
        var total: Int64 = 0
        var count = 0
        while true {
            var entry: OpaquePointer?
            let r = archive_read_next_header(reader, &entry)
            if r == ARCHIVE_EOF { break }
            guard r >= ARCHIVE_WARN, let entry else {
                throw ArchiveError.libarchive(operation: "read header", message: archiveMessage(reader))
            }
            count += 1
            guard count <= limits.maxEntries else { throw ArchiveError.tooLarge(path: "", reason: "more than \(limits.maxEntries) entries") }
            guard let cpath = archive_entry_pathname(entry) else { throw ArchiveError.unsafeEntry(path: "", reason: "entry without a path") }
            let rawPath = String(cString: cpath)
            let path = try checkPath(rawPath, root: root, limits: limits)
            if archive_entry_hardlink(entry) != nil { throw ArchiveError.unsafeEntry(path: rawPath, reason: "hard link") }
            if archive_entry_symlink(entry) != nil { throw ArchiveError.unsafeEntry(path: rawPath, reason: "symbolic link") }
            let type = UInt32(archive_entry_filetype(entry)) & EntryType.mask
            switch type {
            case EntryType.regular, EntryType.directory: break
            case EntryType.symlink: throw ArchiveError.unsafeEntry(path: rawPath, reason: "symbolic link")
            default: throw ArchiveError.unsafeEntry(path: rawPath, reason: "not a regular file or folder (type \(String(type, radix: 8)))")
            }
            if archive_entry_sparse_count(entry) > 0 { throw ArchiveError.unsafeEntry(path: rawPath, reason: "sparse file") }
            guard seen.insert(path).inserted else { throw ArchiveError.unsafeEntry(path: rawPath, reason: "repeated entry") }
            let isFile = type == EntryType.regular
            if isFile {
                guard archive_entry_size_is_set(entry) != 0 else { throw ArchiveError.unsafeEntry(path: rawPath, reason: "no size") }
                let declared = archive_entry_size(entry)
                guard declared >= 0, declared <= limits.maxEntryBytes else {
                    throw ArchiveError.tooLarge(path: rawPath, reason: "declares \(declared) bytes, over the \(limits.maxEntryBytes)-byte entry limit")
                }
                guard declared <= limits.maxTotalBytes - total else {
                    throw ArchiveError.tooLarge(path: rawPath, reason: "the archive's declared sizes exceed the \(limits.maxTotalBytes)-byte limit")
                }
            }
            archive_entry_set_pathname(entry, path)
            archive_entry_set_perm(entry, isFile ? 0o600 : 0o700)
            guard archive_write_header(writer, entry) >= ARCHIVE_WARN else {
                throw ArchiveError.libarchive(operation: "extract \(rawPath)", message: archiveMessage(writer))
            }
            if isFile {
                var entryBytes: Int64 = 0
                let declared = archive_entry_size(entry)
                while true {
                    var block: UnsafeRawPointer?
                    var size = 0
                    var offset: la_int64_t = 0
                    let rr = archive_read_data_block(reader, &block, &size, &offset)
                    if rr == ARCHIVE_EOF { break }
                    guard rr >= ARCHIVE_WARN else {
                        throw ArchiveError.libarchive(operation: "read \(rawPath)", message: archiveMessage(reader))
                    }
                    entryBytes += Int64(size)
                    total += Int64(size)
                    guard entryBytes <= declared, entryBytes <= limits.maxEntryBytes, total <= limits.maxTotalBytes else {
                        throw ArchiveError.tooLarge(path: rawPath, reason: "holds more data than allowed")
                    }
                    guard archive_write_data_block(writer, block, size, offset) >= ARCHIVE_WARN else {
                        throw ArchiveError.libarchive(operation: "extract \(rawPath)", message: archiveMessage(writer))
                    }
                }
                files.append(path)
            }
            guard archive_write_finish_entry(writer) >= ARCHIVE_WARN else {
                throw ArchiveError.libarchive(operation: "extract \(rawPath)", message: archiveMessage(writer))
            }
        }
        guard archive_write_close(writer) >= ARCHIVE_WARN else {
            throw ArchiveError.libarchive(operation: "close extraction", message: archiveMessage(writer))
        }
        return files
    }
}
