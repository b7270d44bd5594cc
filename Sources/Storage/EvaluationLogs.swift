import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The append-only logs kept in the store's `evaluations/` folder for the pipeline, one schema each.
/// The store owns them like every other file under its root: appends happen under the store lock,
/// and opening the store cuts a torn last line.
public enum EvaluationLog: String, CaseIterable, Sendable {
    /// One line per processed batch (its means, in processing order): what `dafnet report` draws.
    case batches = "batches.jsonl"
    /// What became of every batch (committed, duplicate, rejected, …), keyed by its SHA-256.
    case journal = "journal.jsonl"
}

extension CheckpointStore {
    /// `evaluations/`: the per-version folders, the batches' evaluation files, the logs, the report.
    public var evaluationsFolder: URL { URL(fileURLWithPath: evaluationsPath, isDirectory: true) }

    func logPath(_ log: EvaluationLog) -> String { evaluationsPath + "/" + log.rawValue }

    /// Appends one line (a newline is added) to `log`, under the store lock, and syncs it.
    public func append(_ line: Data, to log: EvaluationLog) throws {
        guard !line.contains(UInt8(ascii: "\n")) else { throw StoreError.invalidCommit("a log line must not hold a newline") }
        try withLock {
            try storeIO {
                try cutTornLine(logPath(log))
                var bytes = line
                bytes.append(UInt8(ascii: "\n"))
                try bytes.withUnsafeBytes { try fileSystem.append(toFileAtPath: logPath(log), contents: $0) }
                try fileSystem.syncFile(atPath: logPath(log))
            }
        }
    }

    /// The complete lines of `log`, in order (none when it does not exist yet; a torn last line,
    /// which the next open cuts, is left out).
    public func lines(of log: EvaluationLog) throws -> [Data] {
        let path = logPath(log)
        guard FileUtil.exists(path) else { return [] }
        let data = try storeIO { try FileUtil.read(path) }
        var lines = data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).map { Data($0) }
        lines.removeLast()  // after the last newline: empty, or a torn line
        return lines.filter { !$0.isEmpty }
    }

    /// Writes a file directly in `evaluations/` (a batch's evaluation file, the report) atomically.
    @discardableResult
    public func writeEvaluationsFile(_ data: Data, named name: String) throws -> URL {
        guard !name.isEmpty, !name.contains("/"), !name.contains("\0"), name != ".", name != "..",
              !name.hasPrefix(Self.tempPrefix), !EvaluationLog.allCases.map(\.rawValue).contains(name) else {
            throw StoreError.invalidCommit("'\(name)' is not a file name for evaluations/")
        }
        let target = evaluationsPath + "/" + name
        try installSynced(data, at: target, in: evaluationsPath)
        return URL(fileURLWithPath: target)
    }

    /// Recovery of the logs: a torn last line is cut; the batch log of stores made before it was
    /// renamed (`evaluations/history.jsonl`, beside the store's own `history.jsonl` of another schema)
    /// takes its name.
    func recoverLogs(_ report: inout RecoveryReport) throws {
        let legacy = evaluationsPath + "/history.jsonl"
        if FileUtil.exists(legacy) && !FileUtil.exists(logPath(.batches)) {
            try fileSystem.rename(atPath: legacy, toPath: logPath(.batches))
            try fileSystem.syncDirectory(atPath: evaluationsPath)
        }
        for log in EvaluationLog.allCases where try cutTornLine(logPath(log)) { report.truncatedLogs.append(log.rawValue) }
    }

    /// Cuts a last line that lacks its newline (an append a crash interrupted) from an append-only log
    /// of the store (history.jsonl, the evaluation logs). Returns whether it did.
    @discardableResult
    func cutTornLine(_ path: String) throws -> Bool {
        guard let size = FileUtil.fileSize(path), size > 0 else { return false }
        let data = try FileUtil.read(path)
        guard data.last != UInt8(ascii: "\n") else { return false }
        let keep = (data.lastIndex(of: UInt8(ascii: "\n")).map { $0 + 1 }) ?? 0
        guard truncate(path, off_t(keep)) == 0 else { throw FileIOError("truncate", path) }
        try fileSystem.syncFile(atPath: path)
        return true
    }
}
