import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The file-system steps a checkpoint store mutates through. Every commit, rollback, import and gc
/// goes through these calls and nothing else, so a test can wrap the real implementation and make
/// the k-th step fail (fault injection over the real file system).
public protocol StoreFileSystem: Sendable {
    /// Creates `path` (which must not exist) and writes `contents` to it; no fsync.
    func writeNewFile(atPath path: String, contents: UnsafeRawBufferPointer) throws
    /// Appends `contents` to `path`, creating it if needed; no fsync.
    func append(toFileAtPath path: String, contents: UnsafeRawBufferPointer) throws
    /// fsync of a file's data and metadata.
    func syncFile(atPath path: String) throws
    /// Atomic rename, replacing `to` if it exists.
    func rename(atPath from: String, toPath to: String) throws
    /// fsync of a directory, making renames and removals in it durable.
    func syncDirectory(atPath path: String) throws
    /// Removes a file (not a directory).
    func removeFile(atPath path: String) throws
}

/// The real implementation over POSIX calls.
public struct POSIXFileSystem: StoreFileSystem {
    public init() {}

    /// Writes every byte of `buffer` to `fd`, retrying short writes and EINTR.
    static func writeAll(fd: Int32, _ buffer: UnsafeRawBufferPointer, path: String) throws {
        guard var p = buffer.baseAddress else { return }
        var left = buffer.count
        while left > 0 {
            #if canImport(Glibc)
            let n = Glibc.write(fd, p, left)
            #else
            let n = Darwin.write(fd, p, left)
            #endif
            if n < 0 {
                if errno == EINTR { continue }
                throw FileIOError("write", path)
            }
            p += n
            left -= n
        }
    }

    public func writeNewFile(atPath path: String, contents: UnsafeRawBufferPointer) throws {
        try Self.write(path, flags: O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, contents, opening: "create")
    }

    public func append(toFileAtPath path: String, contents: UnsafeRawBufferPointer) throws {
        try Self.write(path, flags: O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, contents, opening: "open for append")
    }

    /// Opens `path` with `flags`, writes all of `contents`, closes (closing on failure too).
    private static func write(_ path: String, flags: Int32, _ contents: UnsafeRawBufferPointer, opening: String) throws {
        let fd = open(path, flags, 0o644)
        guard fd >= 0 else { throw FileIOError(opening, path) }
        do {
            try writeAll(fd: fd, contents, path: path)
        } catch {
            close(fd)
            throw error
        }
        guard close(fd) == 0 else { throw FileIOError("close", path) }
    }

    public func syncFile(atPath path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FileIOError("open for fsync", path) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw FileIOError("fsync", path) }
    }

    public func rename(atPath from: String, toPath to: String) throws {
        #if canImport(Glibc)
        let r = Glibc.rename(from, to)
        #else
        let r = Darwin.rename(from, to)
        #endif
        guard r == 0 else { throw FileIOError("rename to \(to)", from) }
    }

    public func syncDirectory(atPath path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw FileIOError("open directory", path) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw FileIOError("fsync directory", path) }
    }

    public func removeFile(atPath path: String) throws {
        guard unlink(path) == 0 else { throw FileIOError("remove", path) }
    }
}

/// What a path is, without following a symbolic link.
public enum FileKind: Equatable, Sendable {
    case regular, directory, symbolicLink, other, missing
}

/// The one file layer for everything outside the injectable store protocol (the pipeline's inbox and
/// locks, exports, archives, reads): listings, stat, durable renames and atomic writes.
public enum FileUtil {
    /// Names in a directory (no `.`/`..`), sorted; an absent directory gives an empty list. Names that are
    /// not valid UTF-8 are left out (`listChecked` reports them).
    public static func list(_ path: String) throws -> [String] {
        do { return try listChecked(path).names.sorted() } catch let e as FileIOError where e.code == ENOENT { return [] }
    }

    /// Names in a directory (no `.`/`..`), unsorted, and, shown with replacement characters, the names
    /// that are not valid UTF-8 (no String can name them exactly). An absent directory is an error.
    public static func listChecked(_ path: String) throws -> (names: [String], notUTF8: [String]) {
        guard let dir = opendir(path) else { throw FileIOError("list", path) }
        defer { closedir(dir) }
        var out: [String] = [], bad: [String] = []
        while let entry = readdir(dir) {
            withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: Int(NAME_MAX) + 1) { p in
                    if let name = String(validatingCString: p) {
                        if name != "." && name != ".." { out.append(name) }
                    } else {
                        bad.append(String(cString: p))
                    }
                }
            }
        }
        return (out, bad)
    }

    /// What `path` is (`lstat`: a link is reported as one).
    public static func entryKind(_ path: String) -> FileKind {
        switch kind(path) {
        case nil: return .missing
        case S_IFREG?: return .regular
        case S_IFDIR?: return .directory
        case S_IFLNK?: return .symbolicLink
        default: return .other
        }
    }

    /// A regular file's modification time (seconds since 1970) and size; nil for anything else.
    public static func regularFileInfo(_ path: String) -> (mtime: Double, size: Int)? {
        var st = stat()
        guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return nil }
        #if canImport(Glibc)
        let t = Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) / 1e9
        #else
        let t = Double(st.st_mtimespec.tv_sec) + Double(st.st_mtimespec.tv_nsec) / 1e9
        #endif
        return (t, Int(st.st_size))
    }

    /// Whether a file is non-empty and its last byte is a newline (true when it cannot be read: reading it
    /// reports that).
    public static func endsWithNewline(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { return true }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_size > 0 else { return false }
        var byte: UInt8 = 0
        guard pread(fd, &byte, 1, st.st_size - 1) == 1 else { return true }
        return byte == UInt8(ascii: "\n")
    }

    /// Atomic rename (replacing `to`).
    public static func rename(_ from: String, _ to: String) throws { try POSIXFileSystem().rename(atPath: from, toPath: to) }

    /// fsync of a directory (renames and removals in it made durable).
    public static func syncDirectory(_ path: String) throws { try POSIXFileSystem().syncDirectory(atPath: path) }

    /// Writes `data` as `path` atomically (`AtomicFile`: temporary file, fsync, rename, fsync of the folder).
    public static func writeAtomically(_ data: Data, to path: String) throws {
        try AtomicFile.write(to: path) { fd in
            try data.withUnsafeBytes { try POSIXFileSystem.writeAll(fd: fd, $0, path: path) }
        }
    }

    /// `lstat` type of a path: nil when absent.
    static func kind(_ path: String) -> mode_t? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return st.st_mode & S_IFMT
    }

    public static func exists(_ path: String) -> Bool { kind(path) != nil }
    static func isDirectory(_ path: String) -> Bool { kind(path) == S_IFDIR }
    static func isRegularFile(_ path: String) -> Bool { kind(path) == S_IFREG }

    static func fileSize(_ path: String) -> Int? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return Int(st.st_size)
    }

    static func makeDirectory(_ path: String) throws {
        if mkdir(path, 0o755) != 0 && errno != EEXIST { throw FileIOError("mkdir", path) }
        guard isDirectory(path) else { throw FileIOError("mkdir (exists and is not a directory)", path, code: ENOTDIR) }
    }

    /// Creates a directory and its missing parents.
    public static func makeDirectories(_ path: String) throws {
        if isDirectory(path) { return }
        let parent = (path as NSString).deletingLastPathComponent
        if !parent.isEmpty && parent != path { try makeDirectories(parent) }
        try makeDirectory(path)
    }

    /// Removes a file or a whole folder tree without following symbolic links.
    static func removeTree(_ path: String) throws {
        guard let k = kind(path) else { return }
        if k == S_IFDIR {
            for name in try list(path) { try removeTree(path + "/" + name) }
            guard rmdir(path) == 0 else { throw FileIOError("rmdir", path) }
        } else {
            guard unlink(path) == 0 else { throw FileIOError("remove", path) }
        }
    }

    /// Regular files under `root`, as paths relative to it, sorted; symbolic links are followed only
    /// when `followLinks` (a model folder from a hub cache); other kinds are skipped.
    static func regularFiles(under root: String, followLinks: Bool = false) throws -> [String] {
        var out: [String] = []
        func walk(_ rel: String, depth: Int = 0) throws {
            guard depth < 32 else { throw FileIOError("walk (more than 32 folder levels, a link loop?)", root + "/" + rel, code: ELOOP) }
            let full = rel.isEmpty ? root : root + "/" + rel
            for name in try list(full) {
                let childRel = rel.isEmpty ? name : rel + "/" + name
                let childFull = root + "/" + childRel
                var st = stat()
                let r = followLinks ? stat(childFull, &st) : lstat(childFull, &st)
                guard r == 0 else { continue }
                switch st.st_mode & S_IFMT {
                case S_IFDIR: try walk(childRel, depth: depth + 1)
                case S_IFREG: out.append(childRel)
                default: continue
                }
            }
        }
        try walk("")
        return out.sorted()
    }

    /// A regular file's bytes (an error beyond `limit` bytes or for anything but a regular file).
    public static func read(_ path: String, limit: Int = Int.max) throws -> Data {
        let bytes = try FileBytes.read(path, limit: limit)
        return Data(bytes.buffer)
    }

    static func randomSuffix() -> String {
        var g = SystemRandomNumberGenerator()
        return String(format: "%016llx", g.next() as UInt64)
    }
}

/// Writes a whole file atomically outside the store protocol (exports, archives): a temporary file
/// in the same folder, fsync, rename over the target, fsync of the folder.
enum AtomicFile {
    static func write(to path: String, _ body: (Int32) throws -> Void) throws {
        let dir = (path as NSString).deletingLastPathComponent
        let temp = (dir.isEmpty ? "." : dir) + "/.tmp-" + ((path as NSString).lastPathComponent) + "-" + FileUtil.randomSuffix()
        let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FileIOError("create", temp) }
        var ok = false
        defer {
            if !ok { unlink(temp) }
        }
        do {
            try body(fd)
            guard fsync(fd) == 0 else { throw FileIOError("fsync", temp) }
        } catch {
            close(fd)
            throw error
        }
        guard close(fd) == 0 else { throw FileIOError("close", temp) }
        let fs = POSIXFileSystem()
        try fs.rename(atPath: temp, toPath: path)
        ok = true
        try fs.syncDirectory(atPath: dir.isEmpty ? "." : dir)
    }
}
