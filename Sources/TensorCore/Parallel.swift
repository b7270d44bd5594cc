import Dispatch
import Foundation

/// Splits work across the machine's cores when there is enough of it.
public enum Parallel {
    /// Number of worker chunks to use: the core count, or fewer when set at start (the ranks of an MPI
    /// job on one machine share its cores). Set it before any parallel work, never during.
    nonisolated(unsafe) public static var cores: Int = max(1, ProcessInfo.processInfo.activeProcessorCount)

    /// Below this many scalar operations a loop stays on the calling thread: the dispatch costs more.
    public static let minimumWork = 1 << 15

    /// Calls `body(range)` over disjoint chunks of `0..<count`, in parallel when `count * costPerItem`
    /// is large enough. `body` must only write memory that belongs to its own range.
    @inline(__always)
    public static func forChunks(_ count: Int, costPerItem: Int = 1, _ body: (Range<Int>) -> Void) {
        if count <= 0 { return }
        let chunks = min(cores, count)
        if chunks <= 1 || count * costPerItem < minimumWork || insideLoop {
            body(0..<count)
            return
        }
        let size = (count + chunks - 1) / chunks
        DispatchQueue.concurrentPerform(iterations: chunks) { c in
            let lo = c * size
            let hi = min(count, lo + size)
            guard lo < hi else { return }
            let outer = pthread_getspecific(loopKey)
            pthread_setspecific(loopKey, UnsafeRawPointer(bitPattern: 1))
            defer { pthread_setspecific(loopKey, outer) }
            body(lo..<hi)
        }
    }

    /// Marks the threads running a chunk of a parallel loop: a loop inside a chunk (a kernel called by one of
    /// two networks run side by side) stays on its thread, since the outer loop already holds the cores.
    private static let loopKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    /// Whether the calling thread runs a chunk of a parallel loop.
    public static var insideLoop: Bool { pthread_getspecific(loopKey) != nil }

    /// Calls `body(i)` for each `i` in `0..<count`, in parallel when worthwhile.
    @inline(__always)
    public static func forEach(_ count: Int, costPerItem: Int = 1, _ body: (Int) -> Void) {
        forChunks(count, costPerItem: costPerItem) { range in for i in range { body(i) } }
    }
}

/// One result slot per task of a parallel loop, each written only by its own task (no two tasks share a
/// slot, so the slots need no lock; they are read after the loop).
public final class ResultSlots<T>: @unchecked Sendable {
    private let slots: UnsafeMutableBufferPointer<T?>

    public init(count: Int) {
        slots = .allocate(capacity: count)
        slots.initialize(repeating: nil)
    }

    deinit {
        _ = slots.deinitialize()
        slots.deallocate()
    }

    public subscript(_ i: Int) -> T? {
        get { slots[i] }
        set { slots[i] = newValue }
    }
}
