import Foundation

/// Why a checkpoint-store operation failed. The store refuses to load anything that does not check
/// out (hash mismatch, bad frame, bad manifest) with one of these.
public enum StoreError: Error, CustomStringConvertible, Sendable {
    case io(FileIOError)
    case storeNotFound(path: String)
    case notAStore(path: String, reason: String)
    case locked(path: String, waitedSeconds: Double)
    case empty(path: String)
    case versionNotFound(Int)
    case invalidVersionReference(String)
    case badHead(path: String, reason: String)
    case badManifest(path: String, reason: String)
    case missingBlob(hash: String, version: Int, entry: String)
    case hashMismatch(path: String, expected: String, actual: String)
    case corruptBlob(hash: String, reason: String)
    case stateMismatch(version: Int, expected: String, actual: String)
    case invalidCommit(String)
    case notEnoughAncestors(from: Int, steps: Int, reached: Int)
    case tensorNotFound(name: String, version: Int)
    case fileNotFound(name: String, version: Int)
    /// HEAD moved to `version` but a later step (directory fsync, history record) failed.
    case currentWithError(version: Int, underlying: String)
    case gcRefused(String)
    case baseModelMismatch(version: Int, stored: String, given: String)
    case manifestChanged(version: Int, recordedBy: String, expected: String, actual: String)
    /// A version rebuilt by replay (`replay_edits`) lacks an ancestor it is rebuilt from.
    case replayChainBroken(version: Int, missing: Int)

    public var description: String {
        switch self {
        case .io(let e): return e.description
        case .storeNotFound(let path): return "no checkpoint store at \(path)"
        case .notAStore(let path, let reason): return "\(path) is not a checkpoint store: \(reason)"
        case .locked(let path, let waited): return "checkpoint store \(path) is locked by another process (waited \(Int(waited)) s)"
        case .empty(let path): return "checkpoint store \(path) has no version yet"
        case .versionNotFound(let v): return "version \(v) does not exist"
        case .invalidVersionReference(let s): return "'\(s)' is not a version (a number, HEAD or HEAD~K)"
        case .badHead(let path, let reason):
            return "\(path): bad HEAD: \(reason); `dafnet checkpoints repair` sets it to the last recorded HEAD (or `--to V`)"
        case .badManifest(let path, let reason): return "\(path): bad manifest: \(reason)"
        case .missingBlob(let hash, let version, let entry): return "version \(version): blob \(hash) of '\(entry)' is missing"
        case .hashMismatch(let path, let expected, let actual):
            return "\(path): hash mismatch (expected \(expected), found \(actual)): the file is corrupted"
        case .corruptBlob(let hash, let reason): return "blob \(hash): \(reason)"
        case .stateMismatch(let version, let expected, let actual):
            return "version \(version): state_sha256 is \(actual), the manifest says \(expected)"
        case .invalidCommit(let reason): return "invalid commit: \(reason)"
        case .notEnoughAncestors(let from, let steps, let reached):
            return "version \(from) has only \(reached) ancestor(s) in the store, cannot go back \(steps)"
        case .tensorNotFound(let name, let version): return "version \(version) has no tensor '\(name)'"
        case .fileNotFound(let name, let version): return "version \(version) has no file '\(name)'"
        case .currentWithError(let version, let underlying):
            return "version \(version) is now current, but a final step failed: \(underlying)"
        case .gcRefused(let reason): return "gc refused: \(reason)"
        case .manifestChanged(let version, let by, let expected, let actual):
            return "\(Manifest.fileName(version)) was changed after it was made: \(by) records sha256 \(expected), the file has \(actual)"
        case .replayChainBroken(let version, let missing):
            return "version \(version) stores only what its editor cannot rebuild, and version \(missing), on the way to the ancestor it is rebuilt from, is missing"
        case .baseModelMismatch(let version, let stored, let given):
            return "version \(version) was made on the base model with weights sha256 \(stored), but the model folder given has \(given): its edits belong to another model (--allow-other-base-model applies them anyway)"
        }
    }
}

/// Runs `body`, turning a bare `FileIOError` into `StoreError.io`.
@inline(__always)
func storeIO<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let e as FileIOError {
        throw StoreError.io(e)
    }
}
