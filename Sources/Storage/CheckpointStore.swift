import Crypto
import Foundation
import TensorCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Settings of a checkpoint store.
///
/// The defaults come from `dafnet bench store` (release build, this project's 2-core machine; the
/// synthetic GPT-2-small-like edit state: 3 blocks × c_fc/c_proj ΔW [256,1024]/[1024,256] + Δb,
/// 6.3 MB, each ΔW a sum of 8 outer products + 1 % noise):
///
/// | level | shuffle | ratio | commit MB/s | load MB/s | encode MB/s |
/// |------:|:-------:|------:|------------:|----------:|------------:|
/// | 1 | no  | 1.080 | 222 | 463 | 650 |
/// | 1 | yes | 1.186 | 242 | 604 | 587 |
/// | 3 | no  | 1.080 | 248 | 475 | 634 |
/// | 3 | yes | 1.171 | 210 | 585 | 433 |
/// | 9 | no  | 1.080 | 105 | 502 | 191 |
/// | 9 | yes | 1.178 |  78 | 626 | 104 |
///
/// Float32 ΔW values have near-random mantissas, so only the sign/exponent bytes compress: the byte
/// shuffle is what gains (+10 % ratio, and faster loads); the level hardly changes the ratio.
public struct StoreConfiguration: Sendable {
    /// zstd level for new blobs. Default 1: on the benchmark state it compresses as well as 3 and 9
    /// (1.186 vs 1.171 and 1.178) at the highest encode speed. (Only a rank-1 ΔW favoured level 3,
    /// by 4 % of ratio at 20 % less speed.)
    public var compressionLevel: Int32
    /// Byte-shuffle Float32 tensors before compressing. Default on: ratio 1.08 → 1.19 (up to 1.37
    /// for a rank-1 ΔW) and faster loads, for a 10 % lower encode speed.
    public var shuffle: Bool
    /// How long a mutation waits for the store lock, in seconds.
    public var lockTimeout: Double
    /// Largest blob file accepted when reading.
    public var maxBlobBytes: Int
    /// Most parts a tensor grown row by row keeps: at this many its next version stores it whole again,
    /// so a load reads at most this many blobs per tensor and a manifest lists at most this many parts per
    /// tensor (every open of the store decodes every manifest). 128: the 100 versions of the README's
    /// measurement never rewrite their rows (at 64 they did once, +35 MB), and a manifest of the sample
    /// editor's 41 tensors stays near 1 MB.
    public var maxTensorParts: Int

    public init(compressionLevel: Int32 = 1, shuffle: Bool = true, lockTimeout: Double = 60, maxBlobBytes: Int = 1 << 36,
                maxTensorParts: Int = 128) {
        self.compressionLevel = compressionLevel
        self.shuffle = shuffle
        self.lockTimeout = lockTimeout
        self.maxBlobBytes = maxBlobBytes
        self.maxTensorParts = max(1, maxTensorParts)
    }
}

/// What one commit stores.
public struct CommitRequest {
    /// The edit state: per-module ΔW and Δb, the auxiliary sequence representations, …
    public var tensors: [String: Tensor]
    /// Extra named byte files (for example the edit log); not part of `state_sha256`.
    public var files: [String: Data]
    public var baseModelSHA256: String?
    public var editorSHA256: String?
    public var batch: BatchReference?
    /// Free-form JSON such as the batch evaluation.
    public var info: JSONValue?
    /// Set when `tensors` are only part of the state: the rest is rebuilt by applying this many edits again
    /// from the nearest ancestor holding its whole state (`Manifest.replayEdits`).
    public var replayEdits: Int?
    /// The OpenBLAS thread count the batch was applied with (`Manifest.blasThreads`).
    public var blasThreads: Int?
    /// Tensors of the state left out of a whole version because the editor computes them from the rest
    /// (`Manifest.derived`); empty: none.
    public var derived: [String]

    public init(tensors: [String: Tensor], files: [String: Data] = [:], baseModelSHA256: String? = nil,
                editorSHA256: String? = nil, batch: BatchReference? = nil, info: JSONValue? = nil, replayEdits: Int? = nil,
                blasThreads: Int? = nil, derived: [String] = []) {
        self.tensors = tensors
        self.files = files
        self.baseModelSHA256 = baseModelSHA256
        self.editorSHA256 = editorSHA256
        self.batch = batch
        self.info = info
        self.replayEdits = replayEdits
        self.blasThreads = blasThreads
        self.derived = derived
    }
}

/// What opening a store cleaned up.
public struct RecoveryReport: Sendable, Equatable {
    /// Temporary files and folders of interrupted operations.
    public var removedTemporary: [String] = []
    /// Blobs no manifest references (written by a commit that never wrote its manifest).
    public var removedBlobs: [String] = []
    /// A torn last line of history.jsonl was cut off.
    public var truncatedHistory = false
    /// The evaluation logs (`evaluations/…`) whose torn last line was cut off.
    public var truncatedLogs: [String] = []
    /// HEAD had moved without its history record (a crash right after the move); one was added.
    public var recordedHead = false
    /// Versions whose manifest was written by a commit or an import that never made them known (a
    /// crash before HEAD named them and before their history record): removed, so the operation is
    /// undone as a whole and the store is at the old version.
    public var removedUnfinishedVersions: [Int] = []
    /// Why unreferenced blobs were left alone (an unreadable manifest), if they were.
    public var blobCleanupSkipped: String?

    public var isEmpty: Bool {
        removedTemporary.isEmpty && removedBlobs.isEmpty && !truncatedHistory && truncatedLogs.isEmpty && !recordedHead && removedUnfinishedVersions.isEmpty
    }
}

/// What opening a store cleans up of interrupted operations.
public enum Recovery: Sendable, Equatable {
    /// Nothing: the store as it lies on disk.
    case none
    /// What a reader could trip over: temporary files, a torn history or log line, versions no record
    /// names, HEAD's missing history record. Cost: listings and the history, whatever the store holds.
    case leftovers
    /// `leftovers`, and blobs that no manifest references (an interrupted commit's or gc's). Reads every
    /// manifest: for writers (the daemon, gc, rollback, restores), not for each read of a version.
    case full
}

/// A version read back and verified.
public struct LoadedVersion {
    public let manifest: Manifest
    public let tensors: [String: Tensor]
}

/// A versioned, content-addressed, zstd-compressed store of edit states (a folder, by default
/// `./checkpoints`):
///
/// ```
/// store.json          marker and format
/// HEAD                the current version number
/// lock                flock'ed by every mutation (commit, rollback, import, gc, recovery)
/// history.jsonl       append-only: every move of HEAD and every gc (HistoryRecord)
/// objects/<sha256>    blobs: 8-byte header + one zstd frame; the hash is over these stored bytes
/// versions/NNNNNNNN.json   immutable manifests
/// evaluations/vNNNNNNNN/   evaluation files of a version (written by the pipeline through the store)
/// evaluations/*.jsonl      the pipeline's logs (EvaluationLog), appended under the lock
/// ```
///
/// A commit writes the new blobs, then the manifest, then HEAD, each as a temporary file, fsync,
/// rename, fsync of the folder; then appends its history record. The commit is done once HEAD names
/// the new version, so a crash leaves the store at the old or the new version. Opening cleans what an
/// interrupted operation left: temporary files, a manifest that neither HEAD nor the history names
/// (its commit is undone), blobs no manifest references, a torn history line. Versions keep their numbers; a new commit gets
/// one more than any number ever used, with the current HEAD as parent. Reading re-hashes every
/// blob, checks its zstd frame (content checksum) and, for a whole version, its `state_sha256`.
public final class CheckpointStore: @unchecked Sendable {
    public static let defaultPath = "./checkpoints"
    static let markerFormat = "dafnet-checkpoint-store/1"
    static let tempPrefix = ".tmp-"

    public let root: URL
    public let configuration: StoreConfiguration
    public let fileSystem: any StoreFileSystem
    /// What opening cleaned up (nil when opened with `recover: .none`).
    public private(set) var recovery: RecoveryReport?

    let rootPath: String
    var objectsPath: String { rootPath + "/objects" }
    var versionsPath: String { rootPath + "/versions" }
    var evaluationsPath: String { rootPath + "/evaluations" }
    var headPath: String { rootPath + "/HEAD" }
    var historyPath: String { rootPath + "/history.jsonl" }
    var lockPath: String { rootPath + "/lock" }
    var markerPath: String { rootPath + "/store.json" }

    /// Opens the store at `url`. With `create`, a missing folder (or one holding only hidden files)
    /// becomes a new empty store. `recover` says what leftovers of interrupted operations are cleaned
    /// under the store lock (all of them by default).
    public init(at url: URL, create: Bool = false, configuration: StoreConfiguration = StoreConfiguration(),
                fileSystem: any StoreFileSystem = POSIXFileSystem(), recover: Recovery = .full) throws {
        root = url.standardizedFileURL
        rootPath = root.path
        self.configuration = configuration
        self.fileSystem = fileSystem
        try storeIO { try openOrCreate(create: create) }
        // A store this process cannot write (permissions, a read-only mount) is opened for reading:
        // nothing to clean up from here, and reads take a shared lock when they take one.
        if recover != .none && faccessat(AT_FDCWD, rootPath, W_OK, AT_EACCESS) == 0 {
            recovery = try withLock { try recoverLocked(recover) }
        }
    }

    private func openOrCreate(create: Bool) throws {
        if !FileUtil.exists(rootPath) {
            guard create else { throw StoreError.storeNotFound(path: rootPath) }
            try FileUtil.makeDirectories(rootPath)
        }
        guard FileUtil.isDirectory(rootPath) else { throw StoreError.notAStore(path: rootPath, reason: "not a folder") }
        if !FileUtil.exists(markerPath) {
            guard create else {
                if try FileUtil.list(rootPath).allSatisfy({ $0.hasPrefix(".") }) {
                    throw StoreError.storeNotFound(path: rootPath)
                }
                if [versionsPath, objectsPath].contains(where: { (try? FileUtil.list($0))?.isEmpty == false }) {
                    throw StoreError.notAStore(path: rootPath, reason: "no store.json, although it holds versions or blobs; `dafnet checkpoints repair` writes it again")
                }
                throw StoreError.notAStore(path: rootPath, reason: "no store.json")
            }
            // What an interrupted creation may have left (the marker is written last) is not foreign.
            let own: Set<String> = ["objects", "versions", "evaluations", "history.jsonl", "lock"]
            let foreign = try FileUtil.list(rootPath).filter { name in
                guard !name.hasPrefix(".") else { return false }
                guard own.contains(name) else { return true }
                let path = rootPath + "/" + name
                return FileUtil.isDirectory(path) ? !(try FileUtil.list(path)).isEmpty : (FileUtil.fileSize(path) ?? 0) > 0
            }
            guard foreign.isEmpty else {
                throw StoreError.notAStore(path: rootPath, reason: "the folder is not empty (\(foreign.prefix(3).joined(separator: ", ")))")
            }
            for dir in [objectsPath, versionsPath, evaluationsPath] { try FileUtil.makeDirectory(dir) }
            try AtomicFile.write(to: historyPath) { _ in }
            try Self.writeMarker(markerPath)
            return
        }
        let markerData = try FileUtil.read(markerPath, limit: 1 << 16)
        guard let marker = try? JSONValue(parsing: markerData), marker["format"]?.stringValue == Self.markerFormat else {
            throw StoreError.notAStore(path: rootPath, reason: "store.json is not a \(Self.markerFormat) marker")
        }
        for dir in [objectsPath, versionsPath, evaluationsPath] { try FileUtil.makeDirectory(dir) }
    }

    private static func writeMarker(_ path: String) throws {
        let marker = Data("{\"format\":\"\(markerFormat)\"}\n".utf8)
        try AtomicFile.write(to: path) { fd in try marker.withUnsafeBytes { try POSIXFileSystem.writeAll(fd: fd, $0, path: path) } }
    }

    /// Writes `store.json` again in a folder that lost it but still holds a store (`versions/` or
    /// `objects/` with entries). Returns false when the marker was there; throws when the folder does
    /// not look like a store.
    @discardableResult
    public static func repairMarker(at url: URL) throws -> Bool {
        let root = url.standardizedFileURL.path
        if FileUtil.exists(root + "/store.json") { return false }
        let held = ["versions", "objects"].contains { (try? FileUtil.list(root + "/" + $0))?.isEmpty == false }
        guard held else { throw StoreError.notAStore(path: root, reason: "no store.json, and no versions or blobs to keep") }
        try storeIO { try writeMarker(root + "/store.json") }
        return true
    }

    // MARK: Lock

    /// Runs `body` holding the store-wide lock (flock on `lock`; waits up to `lockTimeout`). Not
    /// reentrant: `body` must not call the store's mutating methods, which take the lock themselves.
    ///
    /// `shared`: for reads that need a consistent view (verify): many readers at once, no writer
    /// meanwhile; on a store this process cannot write, the lock file is opened read-only, and where
    /// there is none no writer ever took it, so the body runs without it.
    public func withLock<T>(shared: Bool = false, _ body: () throws -> T) throws -> T {
        var fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        if fd < 0 && shared && (errno == EACCES || errno == EROFS) {
            fd = open(lockPath, O_RDONLY | O_CLOEXEC)
            if fd < 0 && errno == ENOENT { return try body() }
        }
        guard fd >= 0 else { throw StoreError.io(FileIOError("open lock", lockPath)) }
        defer { close(fd) }
        let start = Date()
        while flock(fd, (shared ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0 {
            let e = errno
            if e == EINTR { continue }
            guard e == EWOULDBLOCK || e == EAGAIN else { throw StoreError.io(FileIOError("flock", lockPath, code: e)) }
            let waited = Date().timeIntervalSince(start)
            if waited >= configuration.lockTimeout { throw StoreError.locked(path: rootPath, waitedSeconds: waited) }
            usleep(10_000)
        }
        defer { flock(fd, LOCK_UN) }
        return try body()
    }

    // MARK: Reading

    func manifestPath(_ version: Int) -> String { rootPath + "/" + Manifest.fileName(version) }
    func blobPath(_ hash: String) -> String { objectsPath + "/" + hash }

    /// The folder where the evaluation files of `version` belong (not created here).
    public func evaluationsDirectory(for version: Int) -> URL {
        URL(fileURLWithPath: evaluationsPath + "/" + String(format: "v%08d", version), isDirectory: true)
    }

    /// Writes an evaluation file of `version` (`evaluations/vNNNNNNNN/<name>`) atomically: temporary
    /// file, fsync, rename, fsync of the folder. Archives carry these files with their version.
    @discardableResult
    public func writeEvaluationFile(_ data: Data, named name: String, for version: Int) throws -> URL {
        let parts = name.split(separator: "/", omittingEmptySubsequences: false)
        guard !name.isEmpty, !name.hasPrefix("/"), parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }),
              !name.contains("\0"), !(parts.last?.hasPrefix(Self.tempPrefix) ?? false) else {
            throw StoreError.invalidCommit("evaluation file name '\(name)' is not a relative path")
        }
        _ = try manifest(version)
        let target = evaluationsDirectory(for: version).path + "/" + name
        let dir = (target as NSString).deletingLastPathComponent
        try storeIO { try FileUtil.makeDirectories(dir) }
        try installSynced(data, at: target, in: dir)
        return URL(fileURLWithPath: target)
    }

    /// Writes a whole file outside the commit protocol: temporary file, fsync, rename, fsync of the
    /// folder; the temporary file is removed when a step fails.
    func installSynced(_ data: Data, at target: String, in dir: String) throws {
        try storeIO {
            var temps: [String] = []
            do {
                try data.withUnsafeBytes { try install($0, at: target, in: dir, temps: &temps) }
                try fileSystem.syncDirectory(atPath: dir)
            } catch {
                for t in temps { try? fileSystem.removeFile(atPath: t) }
                throw error
            }
        }
    }

    /// HEAD's version; nil for a store that never had one. A HEAD that is missing although the history
    /// recorded one, unreadable, or naming a version without a manifest is `badHead`: nothing is
    /// committed on top of it until `repairHead` sets it again.
    public func head() throws -> Int? {
        guard FileUtil.exists(headPath) else {
            if let last = try history().last(where: { $0.version != nil }), !(try versions()).isEmpty {
                throw StoreError.badHead(path: headPath, reason: "missing, although the store has versions (the history's last HEAD is \(last.version!))")
            }
            return nil
        }
        return try headRecord().version
    }

    /// HEAD as written: `N SHA256` (the version and its manifest file's hash; `N` alone in stores made
    /// before the hash was recorded), or `0` for the unedited base (version nil).
    func headRecord() throws -> (version: Int?, manifestSHA256: String?) {
        let data = try storeIO { try FileUtil.read(headPath, limit: 200) }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if text == "0" { return (nil, nil) }  // rolled back to the unedited base model
        let parts = text.split(separator: " ", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let v = Int(parts[0]), v >= 1, parts.count == 1 || Hex.isSHA256(String(parts[1])) else {
            throw StoreError.badHead(path: headPath, reason: "'\(text.prefix(40))' is not a version number")
        }
        guard FileUtil.exists(manifestPath(v)) else { throw StoreError.badHead(path: headPath, reason: "names version \(v), which does not exist") }
        return (v, parts.count == 2 ? String(parts[1]) : nil)
    }

    /// Reads a manifest file and checks it against a record of its hash (HEAD's, a child's or a
    /// commit's), when there is one.
    func manifestChecked(_ version: Int, against expected: String?, recordedBy: @autoclosure () -> String) throws -> (Manifest, Data) {
        let data = try manifestData(version)
        if let expected {
            let actual = Hex.sha256(data)
            guard actual == expected else {
                throw StoreError.manifestChanged(version: version, recordedBy: recordedBy(), expected: expected, actual: actual)
            }
        }
        return (try Manifest.decode(data, path: manifestPath(version), expectedVersion: version), data)
    }

    /// Every record of a version's manifest hash: its commit's history record and its children's
    /// `parent_manifest_sha256` (HEAD's is read with HEAD).
    func manifestRecords() throws -> [Int: [(by: String, sha256: String)]] {
        var out: [Int: [(by: String, sha256: String)]] = [:]
        for r in try history() where r.op == .commit {
            if let v = r.version, let h = r.manifestSHA256 { out[v, default: []].append(("its commit record in history.jsonl", h)) }
        }
        for v in try versions() {
            guard let m = try? manifest(v), let p = m.parent, let h = m.parentManifestSHA256 else { continue }
            out[p, default: []].append(("its child \(Manifest.fileName(v))", h))
        }
        return out
    }

    /// Checks a version's manifest against every record of its hash (before HEAD is moved to it).
    func checkManifestRecords(_ version: Int) throws {
        let data = try manifestData(version)
        let actual = Hex.sha256(data)
        for r in try manifestRecords()[version] ?? [] where r.sha256 != actual {
            throw StoreError.manifestChanged(version: version, recordedBy: r.by, expected: r.sha256, actual: actual)
        }
    }

    /// Sets HEAD again on a store whose HEAD is missing or bad: to `version` when given, else to the
    /// history's last HEAD when that version loads, else to the newest version that loads (none: HEAD
    /// is the unedited base, `0`). The target is fully verified; recorded as `repair`.
    /// Returns the record, or nil when HEAD was fine (nothing done unless `version` is given, which
    /// then acts as a rollback).
    @discardableResult
    public func repairHead(to version: Int? = nil) throws -> HistoryRecord? {
        try withLock {
            if (try? head()) != nil, version == nil { return nil }
            func loads(_ v: Int) -> Bool { (try? load(.number(v))) != nil && (try? checkManifestRecords(v)) != nil }
            let all = try versions()
            var target: Int?
            if let version {
                guard all.contains(version) else { throw StoreError.versionNotFound(version) }
                _ = try load(.number(version))
                try checkManifestRecords(version)
                target = version
            } else if let last = try history().last(where: { $0.version != nil })?.version, all.contains(last), loads(last) {
                target = last
            } else {
                target = all.reversed().first(where: loads)
            }
            let record = HistoryRecord(op: .repair, version: target, from: nil)
            try moveHead(to: target ?? 0, record: record)
            return record
        }
    }

    /// Every version with a manifest, ascending.
    public func versions() throws -> [Int] {
        try storeIO { try FileUtil.list(versionsPath) }.compactMap(Self.versionNumber(fileName:)).sorted()
    }

    static func versionNumber(fileName name: String) -> Int? {
        guard name.hasSuffix(".json") else { return nil }
        let digits = name.dropLast(5)
        guard digits.count >= 8, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let v = Int(digits), v >= 1,
              String(format: "%08d", v) == digits else { return nil }
        return v
    }

    /// The validated manifest of `version`.
    public func manifest(_ version: Int) throws -> Manifest {
        let path = manifestPath(version)
        guard FileUtil.exists(path) else { throw StoreError.versionNotFound(version) }
        let data = try storeIO { try FileUtil.read(path, limit: 1 << 28) }
        return try Manifest.decode(data, path: path, expectedVersion: version)
    }

    /// The manifest's bytes as stored.
    public func manifestData(_ version: Int) throws -> Data {
        let path = manifestPath(version)
        guard FileUtil.exists(path) else { throw StoreError.versionNotFound(version) }
        return try storeIO { try FileUtil.read(path, limit: 1 << 28) }
    }

    public func manifest(_ ref: VersionRef) throws -> Manifest { try manifest(resolve(ref)) }

    /// Every manifest, ascending (throws on the first bad one).
    public func manifests() throws -> [Manifest] { try versions().map { try manifest($0) } }

    /// The version number `ref` names.
    public func resolve(_ ref: VersionRef) throws -> Int {
        switch ref {
        case .number(let n):
            guard FileUtil.exists(manifestPath(n)) else { throw StoreError.versionNotFound(n) }
            return n
        case .head:
            guard try head() != nil else { throw StoreError.empty(path: rootPath) }
            let record = try headRecord()
            _ = try manifestChecked(record.version!, against: record.manifestSHA256, recordedBy: "HEAD")
            return record.version!
        case .headMinus(let k):
            // The walk follows parents only through manifests their records vouch for.
            guard try head() != nil else { throw StoreError.empty(path: rootPath) }
            let record = try headRecord()
            let h = record.version!
            var (m, _) = try manifestChecked(h, against: record.manifestSHA256, recordedBy: "HEAD")
            for step in 0..<k {
                guard let p = m.parent, FileUtil.exists(manifestPath(p)) else {
                    throw StoreError.notEnoughAncestors(from: h, steps: k, reached: step)
                }
                let child = m.version
                (m, _) = try manifestChecked(p, against: m.parentManifestSHA256, recordedBy: "its child \(Manifest.fileName(child))")
            }
            return m.version
        }
    }

    /// The versions made by the batch with this sha256 (a retried batch can find its version).
    public func versions(forBatchSHA256 sha256: String) throws -> [Int] {
        try manifests().filter { $0.batch?.sha256 == sha256 }.map(\.version)
    }

    /// Reads `objects/<hash>` and checks that its bytes hash to its name.
    func readVerifiedBlob(_ hash: String) throws -> FileBytes {
        let path = blobPath(hash)
        let bytes = try storeIO { try FileBytes.read(path, limit: configuration.maxBlobBytes) }
        let actual = Hex.sha256(bytes.buffer)
        guard actual == hash else { throw StoreError.hashMismatch(path: path, expected: hash, actual: actual) }
        return bytes
    }

    func blobExists(_ hash: String) -> Bool { FileUtil.isRegularFile(blobPath(hash)) }

    func decodeTensor(_ entry: TensorEntry, version: Int) throws -> Tensor {
        let stored = try entry.readParts { part in
            guard blobExists(part.blob) else { throw StoreError.missingBlob(hash: part.blob, version: version, entry: entry.name) }
            return try readVerifiedBlob(part.blob)
        }
        let tensor = Tensor(uninitializedShape: entry.shape)   // decoded whole, or thrown away
        try entry.decode(stored, into: UnsafeMutableRawPointer(tensor.data))
        return tensor
    }

    public func decodeFile(_ entry: FileEntry, version: Int) throws -> Data {
        guard blobExists(entry.blob) else { throw StoreError.missingBlob(hash: entry.blob, version: version, entry: entry.name) }
        let blob = try readVerifiedBlob(entry.blob)
        var data = Data(count: entry.bytes)
        do {
            try data.withUnsafeMutableBytes { try BlobCodec.decode(blob.buffer, into: $0) }
        } catch let e as BlobError {
            throw StoreError.corruptBlob(hash: entry.blob, reason: "file '\(entry.name)': \(e)")
        }
        return data
    }

    /// Reads, hash-checks and decodes `entries` of `version` on all cores at once; the first failure in their
    /// order is the one thrown.
    func decodeTensors(_ entries: [TensorEntry], version: Int) throws -> [Tensor] {
        let decoded = ResultSlots<Result<Tensor, Error>>(count: entries.count)
        DispatchQueue.concurrentPerform(iterations: entries.count) { i in
            decoded[i] = Result { try decodeTensor(entries[i], version: version) }
        }
        return try entries.indices.map { try decoded[$0]!.get() }
    }

    /// Loads and verifies a whole version: every blob re-hashed and decoded (the tensors on all cores at once),
    /// `state_sha256` recomputed over them in order.
    public func load(_ ref: VersionRef = .head) throws -> LoadedVersion {
        let version = try resolve(ref)
        let m = try manifest(version)
        var tensors: [String: Tensor] = [:]
        var state = StateHasher()
        for (entry, t) in zip(m.tensors, try decodeTensors(m.tensors, version: version)) {
            state.add(name: entry.name, shape: entry.shape, values: UnsafeRawBufferPointer(start: t.data, count: entry.bytes))
            tensors[entry.name] = t
        }
        let actual = state.finalize()
        guard actual == m.stateSHA256 else { throw StoreError.stateMismatch(version: version, expected: m.stateSHA256, actual: actual) }
        for f in m.files { _ = try decodeFile(f, version: version) }
        return LoadedVersion(manifest: m, tensors: tensors)
    }

    /// What rebuilds the whole state of `version` (`Manifest.replayEdits`): the nearest ancestor that holds
    /// its whole state (nil: none does, the rebuild starts from the empty state) and the versions after it up
    /// to `version`, oldest first (empty when `version` holds its whole state). A missing manifest on the way
    /// is an error naming it.
    public func replayChain(of version: Int) throws -> (base: Int?, versions: [ManifestLink]) {
        var chain: [ManifestLink] = []
        var m = try link(version)
        while m.replayEdits != nil {
            chain.append(m)
            guard let p = m.parent else { return (nil, chain.reversed()) }
            guard FileUtil.exists(manifestPath(p)) else {
                throw StoreError.replayChainBroken(version: version, missing: p)
            }
            m = try link(p)
        }
        return (m.version, chain.reversed())
    }

    /// What a walk along the versions reads of a manifest (its tensor list, most of its bytes, not decoded).
    public func link(_ version: Int) throws -> ManifestLink {
        let path = manifestPath(version)
        guard FileUtil.exists(path) else { throw StoreError.versionNotFound(version) }
        let data = try storeIO { try FileUtil.read(path, limit: 1 << 28) }
        return try ManifestLink.decode(data, path: path, expectedVersion: version)
    }

    /// The tensors of a version, verified.
    public func loadTensors(_ ref: VersionRef = .head) throws -> [String: Tensor] { try load(ref).tensors }

    /// One tensor of a version, by name (its blob verified).
    public func tensor(_ name: String, in ref: VersionRef = .head) throws -> Tensor {
        let version = try resolve(ref)
        guard let entry = try manifest(version).tensors.first(where: { $0.name == name }) else {
            throw StoreError.tensorNotFound(name: name, version: version)
        }
        return try decodeTensor(entry, version: version)
    }

    /// One stored file of a version, by name.
    public func fileData(_ name: String, in ref: VersionRef = .head) throws -> Data {
        let version = try resolve(ref)
        guard let entry = try manifest(version).files.first(where: { $0.name == name }) else {
            throw StoreError.fileNotFound(name: name, version: version)
        }
        return try decodeFile(entry, version: version)
    }

    /// A version as a `TensorSource` (tensors read by name on demand), for exports.
    public func source(_ ref: VersionRef = .head) throws -> VersionTensorSource {
        let version = try resolve(ref)
        return VersionTensorSource(store: self, manifest: try manifest(version))
    }

    /// Every history record in order (torn or unreadable lines are skipped; `verify` reports them).
    public func history() throws -> [HistoryRecord] {
        guard FileUtil.exists(historyPath) else { return [] }
        let data = try storeIO { try FileUtil.read(historyPath) }
        let decoder = JSONDecoder()
        return data.split(separator: UInt8(ascii: "\n")).compactMap { try? decoder.decode(HistoryRecord.self, from: Data($0)) }
    }

    // MARK: Writing

    /// Writes `bytes` as `finalPath` through a temporary file in `dir`: write, fsync, rename.
    func install(_ bytes: UnsafeRawBufferPointer, at finalPath: String, in dir: String, temps: inout [String]) throws {
        let temp = dir + "/" + Self.tempPrefix + FileUtil.randomSuffix()
        temps.append(temp)
        try fileSystem.writeNewFile(atPath: temp, contents: bytes)
        try fileSystem.syncFile(atPath: temp)
        try fileSystem.rename(atPath: temp, toPath: finalPath)
        temps.removeLast()
    }

    /// Stores a blob unless an intact copy exists. Returns whether a file was written; a blob that
    /// did not exist before is added to `created`.
    func storeBlob(_ blob: UnsafeRawBufferPointer, hash: String, temps: inout [String], created: inout [String]) throws -> Bool {
        let path = blobPath(hash)
        if FileUtil.exists(path) {
            if (try? readVerifiedBlob(hash)) != nil { return false }
            try install(blob, at: path, in: objectsPath, temps: &temps)
            return true
        }
        try install(blob, at: path, in: objectsPath, temps: &temps)
        created.append(path)
        return true
    }

    /// HEAD names `version` with its manifest file's hash (`0`: the unedited base).
    func writeHead(_ version: Int, temps: inout [String]) throws {
        let text = Data((version == 0 ? "0\n" : "\(version) \(Hex.sha256(try manifestData(version)))\n").utf8)
        try text.withUnsafeBytes { try install($0, at: headPath, in: rootPath, temps: &temps) }
    }

    func appendHistory(_ record: HistoryRecord) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var line = try encoder.encode(record)
        line.append(UInt8(ascii: "\n"))
        try line.withUnsafeBytes { try fileSystem.append(toFileAtPath: historyPath, contents: $0) }
        try fileSystem.syncFile(atPath: historyPath)
    }

    /// One more than any version number the store ever used (manifests and history), so numbers are
    /// never reused, even after gc.
    func nextVersionNumber() throws -> Int {
        var highest = try versions().last ?? 0
        for r in try history() {
            highest = max(highest, r.version ?? 0, r.from ?? 0, r.versions?.max() ?? 0)
        }
        return highest + 1
    }

    /// Commits a new version with the current HEAD as parent and makes it current.
    ///
    /// If this throws, the store is at the old version (a half-written commit is undone, or cleaned
    /// at the next open), except for `StoreError.currentWithError`: then the new version is current
    /// but its final fsync or history record failed.
    @discardableResult
    public func commit(_ request: CommitRequest) throws -> Manifest {
        for name in request.tensors.keys where name.isEmpty || name.contains("\0") {
            throw StoreError.invalidCommit("tensor name '\(name)' is empty or holds NUL")
        }
        for name in request.files.keys where name.isEmpty || name.contains("\0") {
            throw StoreError.invalidCommit("file name '\(name)' is empty or holds NUL")
        }
        for (label, hash) in [("base model", request.baseModelSHA256), ("editor", request.editorSHA256), ("batch", request.batch?.sha256)] {
            if let hash, !Hex.isSHA256(hash) { throw StoreError.invalidCommit("\(label) hash '\(hash)' is not a lowercase sha256 hex string") }
        }
        if let r = request.replayEdits, r < 1 { throw StoreError.invalidCommit("replay_edits \(r) is not positive") }
        if let n = request.blasThreads, n < 1 { throw StoreError.invalidCommit("blas_threads \(n) is not positive") }
        if !request.derived.isEmpty,
           let problem = Manifest.derivedProblem(request.derived, stored: Set(request.tensors.keys), replayEdits: request.replayEdits) {
            throw StoreError.invalidCommit(problem)
        }
        return try withLock { try commitLocked(request) }
    }

    /// How one tensor of a commit is stored: the parent's parts it keeps, the blob of the rest, and the
    /// hash of its raw contents.
    struct EncodedTensor {
        var kept: [TensorPart]
        var blob: (bytes: [UInt8], hash: String, rawBytes: Int)
        var contentSHA256: String
    }

    /// Encodes one tensor. When the parent's tensor of the same name is a prefix of it (same trailing
    /// dimensions, fewer rows, its recorded contents hash matching this tensor's first bytes, its blobs
    /// present, and fewer than `maxTensorParts` parts), the parent's parts are kept and only the new rows
    /// are compressed.
    func encodeTensor(_ t: Tensor, parent: TensorEntry?) throws -> EncodedTensor {
        let raw = UnsafeRawBufferPointer(start: t.data, count: t.count * 4)
        var hasher = SHA256()
        var kept: [TensorPart] = []
        if let p = parent, let prefixHash = p.contentSHA256, p.shape.count == t.shape.count, p.shape.count >= 1,
           p.shape.dropFirst() == t.shape.dropFirst(), p.shape[0] < t.shape[0], p.bytes > 0, p.bytes < raw.count,
           p.parts.count < configuration.maxTensorParts {
            hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: raw[0..<p.bytes]))
            let blobsIntact = p.parts.allSatisfy { FileUtil.fileSize(blobPath($0.blob)) == $0.storedBytes }
            if Hex.string(hasher.finalize()) == prefixHash && blobsIntact { kept = p.parts }
            hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: raw[p.bytes...]))
        } else {
            hasher.update(bufferPointer: raw)
        }
        let start = kept.reduce(0) { $0 + $1.bytes }
        let rest = UnsafeRawBufferPointer(rebasing: raw[start...])
        let blob = try BlobCodec.encode(rest, level: configuration.compressionLevel,
                                        shuffleElementSize: configuration.shuffle ? 4 : nil)
        return EncodedTensor(kept: kept, blob: (blob, blob.withUnsafeBytes { Hex.sha256($0) }, rest.count),
                             contentSHA256: Hex.string(hasher.finalize()))
    }

    /// The state hash of `tensors` (in `Manifest.precedes` order) and each one's encoding: the blobs
    /// compressed on all cores at once, the state hash beside them (the work of a commit).
    func encodeTensors(_ tensors: [Tensor], names: [String], parents: [TensorEntry?]) throws -> (state: String, encoded: [EncodedTensor]) {
        final class Results: @unchecked Sendable {
            let lock = NSLock()
            var encoded: [EncodedTensor?]
            var state = ""
            var error: Error?
            init(_ n: Int) { encoded = Array(repeating: nil, count: n) }
        }
        let results = Results(tensors.count)
        DispatchQueue.concurrentPerform(iterations: tensors.count + 1) { i in
            if i == tensors.count {
                var state = StateHasher()
                for (name, t) in zip(names, tensors) {
                    state.add(name: name, shape: t.shape, values: UnsafeRawBufferPointer(start: t.data, count: t.count * 4))
                }
                let hash = state.finalize()
                results.lock.withLock { results.state = hash }
                return
            }
            do {
                let e = try encodeTensor(tensors[i], parent: parents[i])
                results.lock.withLock { results.encoded[i] = e }
            } catch {
                results.lock.withLock { results.error = results.error ?? error }
            }
        }
        if let e = results.error { throw e }
        return (results.state, results.encoded.map { $0! })
    }

    func commitLocked(_ request: CommitRequest) throws -> Manifest {
        let parent = try head()
        // The new version vouches for its parent's manifest: only one HEAD's record vouches for too.
        var parentSHA: String?
        var parentManifest: Manifest?
        if parent != nil {
            let record = try headRecord()
            let (m, data) = try manifestChecked(parent!, against: record.manifestSHA256, recordedBy: "HEAD")
            parentSHA = Hex.sha256(data)
            parentManifest = m
        }
        let number = try nextVersionNumber()
        var temps: [String] = []
        var created: [String] = []
        var manifestWritten = false
        var headMoved = false
        do {
            let names = request.tensors.keys.sorted(by: Manifest.precedes)
            let parentEntries = Dictionary(uniqueKeysWithValues: (parentManifest?.tensors ?? []).map { ($0.name, $0) })
            let (stateSHA, encoded) = try encodeTensors(names.map { request.tensors[$0]! }, names: names,
                                                        parents: names.map { parentEntries[$0] })
            var tensorEntries: [TensorEntry] = []
            var wroteBlob = false
            for (name, e) in zip(names, encoded) {
                let t = request.tensors[name]!
                let blob = e.blob
                if try blob.bytes.withUnsafeBytes({ try storeBlob($0, hash: blob.hash, temps: &temps, created: &created) }) { wroteBlob = true }
                let parts = e.kept + [TensorPart(blob: blob.hash, bytes: blob.rawBytes, storedBytes: blob.bytes.count)]
                tensorEntries.append(TensorEntry(name: name, shape: t.shape, dtype: Manifest.tensorDType, bytes: t.count * 4,
                                                 parts: parts, contentSHA256: e.contentSHA256))
            }
            var fileEntries: [FileEntry] = []
            for name in request.files.keys.sorted(by: Manifest.precedes) {
                let data = request.files[name]!
                let blob = try data.withUnsafeBytes { try BlobCodec.encode($0, level: configuration.compressionLevel) }
                let hash = blob.withUnsafeBytes { Hex.sha256($0) }
                if try blob.withUnsafeBytes({ try storeBlob($0, hash: hash, temps: &temps, created: &created) }) { wroteBlob = true }
                fileEntries.append(FileEntry(name: name, blob: hash, bytes: data.count, storedBytes: blob.count))
            }
            if wroteBlob { try fileSystem.syncDirectory(atPath: objectsPath) }
            let manifest = Manifest(version: number, parent: parent, parentManifestSHA256: parentSHA, baseModelSHA256: request.baseModelSHA256,
                                    editorSHA256: request.editorSHA256, batch: request.batch, created: Timestamp.now(),
                                    tensors: tensorEntries, files: fileEntries, stateSHA256: stateSHA, info: request.info,
                                    replayEdits: request.replayEdits, blasThreads: request.blasThreads,
                                    derived: request.derived.isEmpty ? nil : request.derived.sorted(by: Manifest.precedes))
            let data = try manifest.encoded()
            try data.withUnsafeBytes { try install($0, at: manifestPath(number), in: versionsPath, temps: &temps) }
            manifestWritten = true
            try fileSystem.syncDirectory(atPath: versionsPath)
            try writeHead(number, temps: &temps)
            headMoved = true
            try fileSystem.syncDirectory(atPath: rootPath)
            try appendHistory(HistoryRecord(op: .commit, version: number, from: parent, source: request.batch?.name,
                                            manifestSHA256: Hex.sha256(data)))
            return manifest
        } catch {
            for t in temps { try? fileSystem.removeFile(atPath: t) }
            if headMoved { throw StoreError.currentWithError(version: number, underlying: "\(error)") }
            if manifestWritten { try? fileSystem.removeFile(atPath: manifestPath(number)) }
            for path in created { try? fileSystem.removeFile(atPath: path) }
            if let e = error as? FileIOError { throw StoreError.io(e) }
            throw error
        }
    }

    /// Makes `ref` current without deleting anything: later versions stay listed and can be rolled
    /// forward to. The target is fully verified first. Recorded in history.jsonl as `rollback`.
    @discardableResult
    public func rollback(to ref: VersionRef) throws -> HistoryRecord {
        try withLock {
            let target = try resolve(ref)
            let current = try head()
            _ = try load(.number(target))
            try checkManifestRecords(target)
            let record = HistoryRecord(op: .rollback, version: target, from: current)
            if current == target { return record }
            try moveHead(to: target, record: record)
            return record
        }
    }

    /// Makes the unedited base model current (HEAD `0`: no edits); the versions stay and can be rolled
    /// forward to, and the next commit starts a new root. Recorded as `rollback` to no version.
    @discardableResult
    public func rollbackToBase() throws -> HistoryRecord {
        try withLock {
            let current = try head()
            let record = HistoryRecord(op: .rollback, version: nil, from: current)
            if current == nil { return record }
            try moveHead(to: 0, record: record)
            return record
        }
    }

    /// Goes back `steps` parents from HEAD.
    @discardableResult
    public func rollback(steps: Int) throws -> HistoryRecord {
        guard steps >= 0 else { throw StoreError.invalidVersionReference("HEAD~\(steps)") }
        return try rollback(to: steps == 0 ? .head : .headMinus(steps))
    }

    /// Writes HEAD (temp, fsync, rename, fsync of the folder) and appends `record`.
    func moveHead(to version: Int, record: HistoryRecord) throws {
        var temps: [String] = []
        do {
            try writeHead(version, temps: &temps)
        } catch {
            for t in temps { try? fileSystem.removeFile(atPath: t) }
            if let e = error as? FileIOError { throw StoreError.io(e) }
            throw error
        }
        do {
            try fileSystem.syncDirectory(atPath: rootPath)
            try appendHistory(record)
        } catch {
            throw StoreError.currentWithError(version: version, underlying: "\(error)")
        }
    }

    // MARK: Recovery

    /// Cleans every leftover of interrupted operations (done by `init` unless told otherwise).
    @discardableResult
    public func recover() throws -> RecoveryReport {
        try withLock { try recoverLocked(.full) }
    }

    func recoverLocked(_ scope: Recovery) throws -> RecoveryReport {
        var report = RecoveryReport()
        try storeIO {
            var dirs = [rootPath, objectsPath, versionsPath, evaluationsPath]
            // Evaluation folders (written with temporary files too), a few levels deep.
            var frontier = [evaluationsPath]
            for _ in 0..<4 {
                frontier = try frontier.flatMap { dir in
                    try FileUtil.list(dir).filter { !$0.hasPrefix(Self.tempPrefix) }.map { dir + "/" + $0 }.filter(FileUtil.isDirectory)
                }
                dirs += frontier
            }
            for dir in dirs {
                var removed = false
                for name in try FileUtil.list(dir) where name.hasPrefix(Self.tempPrefix) {
                    let path = dir + "/" + name
                    if FileUtil.isDirectory(path) { try FileUtil.removeTree(path) } else { try fileSystem.removeFile(atPath: path) }
                    report.removedTemporary.append(path)
                    removed = true
                }
                if removed { try fileSystem.syncDirectory(atPath: dir) }
            }
            // A torn final history line (a crash during the append): cut it off.
            if try cutTornLine(historyPath) { report.truncatedHistory = true }
            try recoverLogs(&report)
        }
        // A version is made known by HEAD naming it or by a history record (commit, rollback, import,
        // gc); a manifest that neither names was left by a commit or import that crashed before either
        // (the commit's caller never heard it succeed, and its batch is still to do): remove it, before
        // its blobs are counted.
        // Only with a readable HEAD, or none and no history (the first commit): a store whose HEAD is
        // lost or damaged keeps every manifest for its repair.
        let records = try history()
        let known = Set(records.flatMap { [$0.version, $0.from].compactMap { $0 } + ($0.versions ?? []) })
        let current: Int?? = try? head()
        if let current, current != nil || records.isEmpty {
            let unfinished = try versions().filter { !known.contains($0) && $0 != current }
            if !unfinished.isEmpty {
                try storeIO {
                    for v in unfinished { try fileSystem.removeFile(atPath: manifestPath(v)) }
                    try fileSystem.syncDirectory(atPath: versionsPath)
                }
                report.removedUnfinishedVersions = unfinished
            }
        }
        if scope == .full { try removeUnreferencedBlobs(&report) }
        // HEAD moved but its history record was never appended.
        if let h = try? head(), try history().last?.version != h {
            try storeIO { try appendHistory(HistoryRecord(op: .recover, version: h, from: nil)) }
            report.recordedHead = true
        }
        return report
    }

    /// Blobs no manifest references (every manifest read): removed only when every manifest reads, so a
    /// damaged manifest never costs its blobs.
    private func removeUnreferencedBlobs(_ report: inout RecoveryReport) throws {
        var referenced = Set<String>()
        for v in try versions() {
            do {
                referenced.formUnion(try manifest(v).blobs)
            } catch {
                report.blobCleanupSkipped = "\(error)"
                return
            }
        }
        try storeIO {
            var removed = false
            for name in try FileUtil.list(objectsPath) where Hex.isSHA256(name) && !referenced.contains(name) {
                try fileSystem.removeFile(atPath: blobPath(name))
                report.removedBlobs.append(name)
                removed = true
            }
            if removed { try fileSystem.syncDirectory(atPath: objectsPath) }
        }
    }
}

/// The tensors of one stored version, read by name on demand (each blob verified when read).
public struct VersionTensorSource: TensorSource {
    public let store: CheckpointStore
    public let manifest: Manifest

    public var tensorNames: [String] { manifest.tensors.map(\.name).sorted() }

    public func tensor(_ name: String) throws -> Tensor {
        guard let entry = manifest.tensors.first(where: { $0.name == name }) else {
            throw StoreError.tensorNotFound(name: name, version: manifest.version)
        }
        return try store.decodeTensor(entry, version: manifest.version)
    }

    public func entry(_ name: String) -> TensorEntry? { manifest.tensors.first { $0.name == name } }

    /// Several tensors by name, read and decoded on all cores at once.
    public func tensors(_ names: [String]) throws -> [String: Tensor] {
        let entries = try names.map { name in
            guard let e = entry(name) else { throw StoreError.tensorNotFound(name: name, version: manifest.version) }
            return e
        }
        return Dictionary(uniqueKeysWithValues: zip(names, try store.decodeTensors(entries, version: manifest.version)))
    }

    /// The version `manifest` (already read) of `store`: its tensors and files read without reading the
    /// manifest again.
    public init(store: CheckpointStore, manifest: Manifest) {
        self.store = store
        self.manifest = manifest
    }
}
