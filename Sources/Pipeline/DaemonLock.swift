import Foundation
import Storage
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One daemon per store: an exclusive `flock` on `STORE/.watch.lock`, held for the life of this object
/// (the process, for `dafnet watch`). The kernel drops it when the process dies, however it dies, so a
/// killed daemon never leaves a stale lock. The file holds the holder's pid, for the message a second
/// daemon prints. (Separate from the store's own `lock`, which every commit and rollback takes briefly,
/// so `dafnet rollback` works while the daemon runs.)
public final class DaemonLock {
    public static let fileName = ".watch.lock"

    public let path: String
    let fd: Int32

    /// Takes the lock of the store at `store` (creating the folder if needed) or throws
    /// `PipelineError.alreadyRunning`.
    public convenience init(store: URL) throws { try self.init(folder: store, kind: "store") }

    /// The same for an inbox (`INBOX/.watch.lock`): two daemons on one inbox would take each other's
    /// claimed batches for leftovers.
    public convenience init(inbox: URL) throws { try self.init(folder: inbox, kind: "inbox") }

    init(folder: URL, kind: String) throws {
        let dir = folder.standardizedFileURL.path
        try FileUtil.makeDirectories(dir)
        path = dir + "/" + Self.fileName
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FileIOError("open", path) }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            if e == EINTR { continue }
            if e == EWOULDBLOCK || e == EAGAIN {
                var buf = [UInt8](repeating: 0, count: 32)
                let n = pread(fd, &buf, 31, 0)
                close(fd)
                let text = n > 0 ? String(decoding: buf[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : ""
                throw PipelineError.alreadyRunning(kind: kind, path: dir, pid: Int32(text))
            }
            close(fd)
            throw PipelineError.io(operation: "flock", path: path, errno: e)
        }
        let pid = Data("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
    }

    deinit {
        flock(fd, LOCK_UN)
        close(fd)
    }
}
