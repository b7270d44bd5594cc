import Dispatch
import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A stop request that any thread (or a signal handler's dispatch source) can make, and that a `poll`
/// can wait on (a self-pipe).
public final class StopSignal: @unchecked Sendable {
    private let lock = NSLock()
    private var requested = false
    let readFD: Int32
    let writeFD: Int32

    public init() {
        var fds: [Int32] = [0, 0]
        _ = pipe(&fds)
        readFD = fds[0]; writeFD = fds[1]
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        }
    }

    deinit { close(readFD); close(writeFD) }

    public var isRequested: Bool { lock.lock(); defer { lock.unlock() }; return requested }

    public func request() {
        lock.lock()
        requested = true
        lock.unlock()
        var b: UInt8 = 1
        _ = write(writeFD, &b, 1)
    }

    /// Routes SIGTERM and SIGINT to `request()`, calling `notice` with the signal's name and whether a stop
    /// was already requested. Keep the returned sources alive for as long as the routing should hold.
    public func requestOnTerminationSignals(_ notice: @escaping @Sendable (_ name: String, _ again: Bool) -> Void) -> [DispatchSourceSignal] {
        [SIGTERM, SIGINT].map { sig in
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            let name = sig == SIGTERM ? "SIGTERM" : "SIGINT"
            source.setEventHandler { [self] in
                notice(name, isRequested)
                request()
            }
            source.resume()
            return source
        }
    }
}

/// `dafnet watch`: holds the store's daemon lock, finishes what a stopped daemon left in `processing/`,
/// then processes the inbox in name order; woken by inotify, with a rescan at start-up, on every wake-up
/// (so a queue overflow loses nothing) and every `rescanInterval` seconds. SIGTERM/SIGINT (after
/// `installSignalHandlers()`) stop it cleanly: a batch not yet committing is abandoned (left in
/// `processing/`, first at the next start); one committing is finished.
public final class PipelineDaemon {
    public let processor: BatchProcessor
    public let lock: DaemonLock
    public let stop = StopSignal()
    public var logger: Logger
    /// Called right before each wait for inotify events (tests use it to act while the daemon is not
    /// reading its queue).
    public var beforeWait: (() -> Void)?
    /// How the waits ended, in order (tests and diagnostics).
    public private(set) var wakes: [InboxWatcher.Wake] = []

    var signalSources: [DispatchSourceSignal] = []

    public init(processor: BatchProcessor, lock: DaemonLock) {
        self.processor = processor
        self.lock = lock
        self.logger = processor.logger
        let stop = self.stop
        processor.shouldStop = { stop.isRequested }
    }

    /// Routes SIGTERM and SIGINT to `requestStop()`.
    public func installSignalHandlers() {
        let logger = self.logger
        signalSources += stop.requestOnTerminationSignals { name, again in
            logger.notice(again ? "\(name) again: already stopping" : "\(name): stopping after the current step")
        }
    }

    public func requestStop() { stop.request() }

    /// Summary of a run.
    public struct Summary: Sendable {
        public var outcomes: [BatchOutcome] = []
        public var stoppedBySignal = false
        public func count(_ s: BatchOutcome.Status) -> Int { outcomes.filter { $0.status == s }.count }
    }

    /// Runs until stopped (or, with `once`, until the inbox is empty).
    @discardableResult
    public func run(once: Bool) throws -> Summary {
        var summary = Summary()
        let p = processor
        logger.notice("daemon started", metadata: [
            "inbox": "\(p.inbox.root.path)", "store": "\(p.store.root.path)",
            "head": "\((try? p.store.head()).flatMap { $0 }.map(String.init) ?? "none")",
            "mode": "\(once ? "once" : "watch")", "guard": "\(p.settings.collapseGuard.enabled ? "on" : "off")",
            "canaries": "\(p.resources.canaries.count)",
        ])
        // Watch before the first scan, so nothing dropped in between is missed.
        let watcher = once ? nil : try InboxWatcher(directory: p.inbox.root)
        summary.outcomes += try p.recoverClaimed()
        var lastScan = Date()
        loop: while !stop.isRequested {
            let next = try p.next()
            lastScan = Date()
            switch next {
            case .batch(let name):
                if let o = try p.claimAndProcess(name) { summary.outcomes.append(o) }
                continue loop
            case .empty where once:
                break loop
            case .empty, .wait:
                break
            }
            var timeout = p.settings.rescanInterval - Date().timeIntervalSince(lastScan)
            if case .wait(let s) = next { timeout = min(timeout, s) }
            timeout = max(0.01, timeout)
            guard let watcher else {
                var fds = [pollfd(fd: stop.readFD, events: Int16(POLLIN), revents: 0)]
                _ = poll(&fds, 1, Int32(timeout * 1000))
                continue
            }
            beforeWait?()
            let wake = watcher.wait(timeout: timeout, stopFD: stop.readFD)
            wakes.append(wake)
            switch wake {
            case .overflow:
                logger.notice("inotify queue overflowed (events lost); rescanning the inbox", metadata: ["overflows": "\(watcher.overflows)"])
            case .files(let names):
                logger.trace("inotify", metadata: ["files": "\(names.count)"])
            case .timeout, .stop:
                break
            }
        }
        summary.stoppedBySignal = stop.isRequested
        logger.notice("daemon stopped", metadata: [
            "committed": "\(summary.count(.committed))", "rejected": "\(summary.count(.rejected))",
            "guarded": "\(summary.count(.guarded))", "duplicates": "\(summary.count(.duplicate))",
            "recovered": "\(summary.count(.recovered))", "abandoned": "\(summary.count(.abandoned))",
            "reason": "\(stop.isRequested ? "stop requested" : "inbox empty")",
        ])
        return summary
    }
}
