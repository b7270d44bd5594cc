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

/// Small helpers over the file system that are not part of the injectable protocol (reads,
/// listings, folder creation).
enum FileUtil {
    /// Names in a directory (no `.`/`..`); an absent directory gives an empty list.
    static func list(_ path: String) throws -> [String] {
        guard let dir = opendir(path) else {
            if errno == ENOENT { return [] }
            throw FileIOError("list", path)
        }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: Int(NAME_MAX) + 1) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    /// `lstat` type of a path: nil when absent.
    static func kind(_ path: String) -> mode_t? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return st.st_mode & S_IFMT
    }

    static func exists(_ path: String) -> Bool { kind(path) != nil }
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
    static func makeDirectories(_ path: String) throws {
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

    static func read(_ path: String, limit: Int = Int.max) throws -> Data {
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
