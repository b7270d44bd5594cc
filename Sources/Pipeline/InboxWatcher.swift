import Foundation
import Storage
#if canImport(Glibc)
import Glibc
#endif

/// Wakes the daemon when a file is closed after writing (`IN_CLOSE_WRITE`) or renamed into the inbox
/// (`IN_MOVED_TO`), through inotify. The events are only a prompt: the daemon rescans the folder on every
/// wake-up, so an overflowed queue (`IN_Q_OVERFLOW`: the kernel dropped events) costs nothing but a note,
/// and a timer rescan covers anything else (a file system without inotify, such as some network mounts).
public final class InboxWatcher {
    public enum Wake: Equatable, Sendable {
        /// Files arrived (names as reported; dot-files included).
        case files([String])
        /// The kernel's event queue overflowed: some events were lost, rescan.
        case overflow
        /// Nothing within the timeout.
        case timeout
        /// The stop descriptor became readable.
        case stop
    }

    public let directory: String
    let fd: Int32
    let wd: Int32
    /// Queue overflows seen so far.
    public private(set) var overflows = 0

    public init(directory: URL) throws {
        self.directory = directory.standardizedFileURL.path
        #if canImport(Glibc)
        fd = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        guard fd >= 0 else { throw FileIOError("inotify_init1", directory.path) }
        wd = inotify_add_watch(fd, self.directory, UInt32(IN_CLOSE_WRITE | IN_MOVED_TO))
        guard wd >= 0 else {
            let e = errno
            close(fd)
            throw PipelineError.io(operation: "inotify_add_watch", path: directory.path, errno: e)
        }
        #else
        throw PipelineError.invalidSetting("inotify is Linux only")
        #endif
    }

    deinit { close(fd) }

    /// Waits up to `timeout` seconds for events (or for `stopFD` to become readable) and drains the queue.
    public func wait(timeout: Double, stopFD: Int32? = nil) -> Wake {
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
        if let s = stopFD { fds.append(pollfd(fd: s, events: Int16(POLLIN), revents: 0)) }
        let ms = Int32(max(0, min(timeout, 86_400)) * 1000)
        var r: Int32
        repeat { r = poll(&fds, nfds_t(fds.count), ms) } while r < 0 && errno == EINTR
        if fds.count > 1 && fds[1].revents & Int16(POLLIN) != 0 { return .stop }
        guard r > 0, fds[0].revents & Int16(POLLIN) != 0 else { return .timeout }
        return drain()
    }

    /// Reads every queued event.
    func drain() -> Wake {
        #if canImport(Glibc)
        var names: [String] = []
        var overflowed = false
        let size = 64 * 1024
        let buf = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { buf.deallocate() }
        while true {
            let n = read(fd, buf, size)
            if n <= 0 { break }
            var off = 0
            while off + MemoryLayout<inotify_event>.size <= n {
                let ev = buf.load(fromByteOffset: off, as: inotify_event.self)
                if ev.mask & UInt32(IN_Q_OVERFLOW) != 0 { overflowed = true }
                if ev.len > 0 {
                    let p = (buf + off + MemoryLayout<inotify_event>.size).assumingMemoryBound(to: CChar.self)
                    names.append(String(cString: p))
                }
                off += MemoryLayout<inotify_event>.size + Int(ev.len)
            }
        }
        if overflowed {
            overflows += 1
            return .overflow
        }
        return names.isEmpty ? .timeout : .files(names)
        #else
        return .timeout
        #endif
    }
}
