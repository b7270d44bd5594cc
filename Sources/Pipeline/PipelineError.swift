import Foundation

/// Why the pipeline stopped (as opposed to a batch being rejected, which is a `BatchOutcome`).
public enum PipelineError: Error, CustomStringConvertible, Sendable {
    /// Another `dafnet watch` holds the daemon lock of this store (or inbox: `kind`).
    case alreadyRunning(kind: String, path: String, pid: Int32?)
    /// A file-system call failed.
    case io(operation: String, path: String, errno: Int32)
    /// A setting or resource is unusable.
    case invalidSetting(String)
    /// HEAD kept moving while a batch was prepared (repeated rollbacks).
    case headUnstable(batch: String, attempts: Int)
    /// A version that stores part of its state could not be rebuilt by replaying its edits.
    case replay(version: Int, reason: String)

    public var description: String {
        switch self {
        case .alreadyRunning(let kind, let path, let pid):
            return "another dafnet watch\(pid.map { " (pid \($0))" } ?? "") is already processing batches for the \(kind) \(path); "
                + "one daemon per \(kind): stop it first or use another --\(kind)"
        case .io(let op, let path, let code):
            return "\(op) \(path): \(String(cString: strerror(code)))"
        case .invalidSetting(let s): return s
        case .headUnstable(let batch, let attempts):
            return "\(batch): HEAD moved during each of \(attempts) attempts; giving up on this batch for now"
        case .replay(let version, let reason):
            return "version \(version) stores only what its editor cannot rebuild, and it cannot be rebuilt: \(reason)"
        }
    }
}
