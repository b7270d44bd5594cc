import Foundation
import Storage
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The inbox folder a daemon watches:
///
/// ```
/// INBOX/NAME.jsonl        batches waiting, taken in file-name order (UTF-8 byte order)
/// INBOX/processing/NAME   the batch being processed (claimed by an atomic rename)
/// INBOX/done/NAME         processed batches (committed, or an identical batch already committed)
/// INBOX/failed/NAME       rejected batches, beside NAME.error.json (line, field, reason)
/// ```
///
/// Only names ending in `.jsonl` are batches. Dot-files and names ending in `.tmp` are ignored, so a
/// producer writes `.NAME.tmp` and renames it in. Name batches with a zero-padded counter
/// (`000042-topic.jsonl`) so that the file-name order is the order they were made in.
public struct Inbox: Sendable {
    public let root: URL
    public var processing: URL { root.appendingPathComponent("processing", isDirectory: true) }
    public var done: URL { root.appendingPathComponent("done", isDirectory: true) }
    public var failed: URL { root.appendingPathComponent("failed", isDirectory: true) }

    public static let batchExtension = ".jsonl"
    public static let errorSuffix = ".error.json"

    /// Opens (creating if needed) the inbox and its subfolders.
    public init(_ root: URL) throws {
        self.root = root.standardizedFileURL
        for dir in [self.root, processing, done, failed] { try FileUtil.makeDirectories(dir.path) }
    }

    /// A batch file waiting in the inbox.
    public struct Candidate: Sendable, Equatable {
        public var name: String
        /// Seconds since its last modification.
        public var age: Double
        public var size: Int
    }

    /// An entry of the inbox that is not taken, and why.
    public struct Ignored: Sendable, Equatable {
        public var name: String
        public var reason: String
    }

    /// What a look at the inbox found.
    public struct Scan: Sendable {
        /// Batches, in processing order.
        public var candidates: [Candidate]
        /// Entries that are not taken (besides dot-files, `*.tmp` and the inbox's own folders), by name:
        /// files that are not `*.jsonl`, symbolic links (never followed), folders, FIFOs and other
        /// special files, names that are not UTF-8.
        public var ignored: [Ignored]
    }

    /// Whether a name in the inbox is a batch: `*.jsonl`, not a dot-file, not `*.tmp`.
    public static func isBatchName(_ name: String) -> Bool {
        !name.hasPrefix(".") && !name.hasSuffix(".tmp") && name.hasSuffix(batchExtension) && name.count > batchExtension.count
    }

    /// The processing order: names compared by their UTF-8 bytes.
    public static func precedes(_ a: String, _ b: String) -> Bool { a.utf8.lexicographicallyPrecedes(b.utf8) }

    /// Lists the batches waiting (regular files only), in processing order.
    public func scan(now: Date = Date()) throws -> Scan {
        var candidates: [Candidate] = []
        var ignored: [Ignored] = []
        let t = now.timeIntervalSince1970
        let (names, notUTF8) = try FileUtil.listChecked(root.path)
        ignored += notUTF8.map { Ignored(name: $0, reason: "the name is not valid UTF-8") }
        let own = Set(["processing", "done", "failed"])
        for name in names where !name.hasPrefix(".") && !name.hasSuffix(".tmp") {
            let path = root.path + "/" + name
            if let info = FileUtil.regularFileInfo(path) {
                if Self.isBatchName(name) {
                    candidates.append(Candidate(name: name, age: t - info.mtime, size: info.size))
                } else {
                    ignored.append(Ignored(name: name, reason: "not a batch (*.jsonl)"))
                }
                continue
            }
            switch FileUtil.entryKind(path) {
            case .symbolicLink: ignored.append(Ignored(name: name, reason: "a symbolic link (never followed)"))
            case .directory where !own.contains(name): ignored.append(Ignored(name: name, reason: "a folder"))
            case .other: ignored.append(Ignored(name: name, reason: "not a regular file (a FIFO, socket or device)"))
            case .directory, .missing, .regular: continue
            }
        }
        candidates.sort { Self.precedes($0.name, $1.name) }
        return Scan(candidates: candidates, ignored: ignored.sorted { Self.precedes($0.name, $1.name) })
    }

    /// Batches left in `processing/` (claimed by a daemon that stopped before finishing them), in order.
    public func claimed() throws -> [String] {
        try FileUtil.list(processing.path).filter { !$0.hasPrefix(".") && ![.missing, .directory].contains(FileUtil.entryKind(processing.path + "/" + $0)) }
            .sorted(by: Self.precedes)
    }

    /// Claims `name` by renaming it into `processing/`. Returns the name it has there, or nil when the
    /// file is gone (another process took it).
    public func claim(_ name: String) throws -> String? {
        let target = uniqueName(name, in: processing.path)
        if rename(root.path + "/" + name, processing.path + "/" + target) != 0 {
            if errno == ENOENT { return nil }
            throw FileIOError("rename", root.path + "/" + name)
        }
        try FileUtil.syncDirectory(processing.path)
        try FileUtil.syncDirectory(root.path)
        return target
    }

    /// Moves a claimed batch to `done/`; returns its name there.
    @discardableResult
    public func markDone(_ claimedName: String) throws -> String {
        try move(claimedName, to: done)
    }

    /// Moves a claimed batch to `failed/` and writes `failed/NAME.error.json` first (so the error is
    /// there whenever the batch is). Returns the batch's name in `failed/`.
    @discardableResult
    public func markFailed(_ claimedName: String, error: Data) throws -> String {
        let target = uniqueName(claimedName, in: failed.path, alsoFree: Self.errorSuffix)
        try FileUtil.writeAtomically(error, to: failed.path + "/" + target + Self.errorSuffix)
        try FileUtil.rename(processing.path + "/" + claimedName, failed.path + "/" + target)
        try FileUtil.syncDirectory(failed.path)
        try FileUtil.syncDirectory(processing.path)
        return target
    }

    func move(_ claimedName: String, to dir: URL) throws -> String {
        let target = uniqueName(claimedName, in: dir.path)
        try FileUtil.rename(processing.path + "/" + claimedName, dir.path + "/" + target)
        try FileUtil.syncDirectory(dir.path)
        try FileUtil.syncDirectory(processing.path)
        return target
    }

    public func claimedPath(_ name: String) -> String { processing.path + "/" + name }

    /// `name`, or `stem~2.jsonl`, `stem~3.jsonl`, … : the first that is free in `dir` (and, with
    /// `alsoFree`, whose name + suffix is free too).
    func uniqueName(_ name: String, in dir: String, alsoFree suffix: String? = nil) -> String {
        func free(_ n: String) -> Bool {
            !FileUtil.exists(dir + "/" + n) && !(suffix.map { FileUtil.exists(dir + "/" + n + $0) } ?? false)
        }
        if free(name) { return name }
        let ext = name.hasSuffix(Self.batchExtension) ? Self.batchExtension : ""
        let stem = String(name.dropLast(ext.count))
        var k = 2
        while !free("\(stem)~\(k)\(ext)") { k += 1 }
        return "\(stem)~\(k)\(ext)"
    }
}
