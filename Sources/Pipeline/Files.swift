import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The few POSIX file steps the pipeline needs: listing, stat, atomic rename, durable writes and
/// appends (temporary file, fsync, rename, fsync of the folder).
enum Files {
    static func fail(_ op: String, _ path: String) -> PipelineError { .io(operation: op, path: path, errno: errno) }

    static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }

    /// Regular file: its modification time (seconds since 1970) and size; nil for anything else.
    static func regularFile(_ path: String) -> (mtime: Double, size: Int)? {
        var st = stat()
        guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return nil }
        #if canImport(Glibc)
        let t = Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) / 1e9
        #else
        let t = Double(st.st_mtimespec.tv_sec) + Double(st.st_mtimespec.tv_nsec) / 1e9
        #endif
        return (t, Int(st.st_size))
    }

    static func makeDirectories(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw PipelineError.io(operation: "mkdir", path: path, errno: EIO)
        }
    }

    /// Names in a folder (no "." or ".."), unsorted; names that are not valid UTF-8 are left out.
    static func list(_ path: String) throws -> [String] { try listChecked(path).names }

    /// Names in a folder (no "." or ".."), unsorted, and, shown with replacement characters, the names
    /// that are not valid UTF-8 (no String can name them exactly).
    static func listChecked(_ path: String) throws -> (names: [String], notUTF8: [String]) {
        guard let dir = opendir(path) else { throw fail("opendir", path) }
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

    /// What kind of entry a path is, without following a symbolic link.
    enum Kind: Equatable {
        case regular, directory, symbolicLink, other, missing
    }

    static func kind(_ path: String) -> Kind {
        var st = stat()
        guard lstat(path, &st) == 0 else { return .missing }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return .regular
        case S_IFDIR: return .directory
        case S_IFLNK: return .symbolicLink
        default: return .other
        }
    }

    /// Whether a file is non-empty and its last byte is a newline (false when it cannot be read: the
    /// processing step reports that).
    static func endsWithNewline(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return true }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_size > 0 else { return false }
        var byte: UInt8 = 0
        guard pread(fd, &byte, 1, st.st_size - 1) == 1 else { return true }
        return byte == UInt8(ascii: "\n")
    }

    static func read(_ path: String, limit: Int) throws -> Data {
        guard let info = regularFile(path) else { throw PipelineError.io(operation: "open", path: path, errno: ENOENT) }
        guard info.size <= limit else { throw PipelineError.io(operation: "read", path: path, errno: EFBIG) }
        guard let h = FileHandle(forReadingAtPath: path) else { throw fail("open", path) }
        defer { try? h.close() }
        do { return try h.readToEnd() ?? Data() } catch { throw PipelineError.io(operation: "read", path: path, errno: EIO) }
    }

    /// Atomic rename (replacing `to`).
    static func rename(_ from: String, _ to: String) throws {
        #if canImport(Glibc)
        let r = Glibc.rename(from, to)
        #else
        let r = Darwin.rename(from, to)
        #endif
        guard r == 0 else { throw fail("rename", from + " → " + to) }
    }

    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw fail("open", path) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw fail("fsync", path) }
    }

    static func writeAll(_ fd: Int32, _ data: Data, path: String) throws {
        try data.withUnsafeBytes { buf in
            guard var p = buf.baseAddress else { return }
            var left = buf.count
            while left > 0 {
                let n = write(fd, p, left)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw fail("write", path)
                }
                p += n
                left -= n
            }
        }
    }

    /// Writes `data` as `path` through a dot-file beside it: write, fsync, rename, fsync of the folder.
    static func writeAtomically(_ data: Data, to path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        let temp = dir + "/.tmp-" + UUID().uuidString.prefix(12).lowercased()
        let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw fail("create", temp) }
        do {
            try writeAll(fd, data, path: temp)
            guard fsync(fd) == 0 else { throw fail("fsync", temp) }
            close(fd)
            try rename(temp, path)
        } catch {
            close(fd)
            unlink(temp)
            throw error
        }
        try syncDirectory(dir)
    }
}
