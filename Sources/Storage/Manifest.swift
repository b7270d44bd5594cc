import Crypto
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The input batch that produced a version.
public struct BatchReference: Codable, Sendable, Equatable {
    public var name: String
    public var sha256: String

    public init(name: String, sha256: String) {
        self.name = name
        self.sha256 = sha256
    }
}

/// One stored piece of a tensor: a blob holding `bytes` consecutive raw bytes of it.
public struct TensorPart: Codable, Sendable, Equatable {
    /// sha256 of the stored blob (`objects/<blob>`).
    public var blob: String
    /// Raw content size of the piece.
    public var bytes: Int
    /// Size of the stored (compressed) blob.
    public var storedBytes: Int

    public init(blob: String, bytes: Int, storedBytes: Int) {
        self.blob = blob
        self.bytes = bytes
        self.storedBytes = storedBytes
    }

    enum CodingKeys: String, CodingKey {
        case blob, bytes
        case storedBytes = "stored_bytes"
    }
}

/// One stored tensor of a version (Float32, little-endian, row-major).
///
/// Its contents are its parts' blobs decoded and concatenated. Most tensors are one blob (written as
/// `blob` and `stored_bytes`, the layout of every earlier manifest). A tensor that only grew by rows
/// since the parent version (the editor's per-edit representations, the router's keys) keeps the
/// parent's parts and adds one part for the new rows (written as `parts`), so a version stores what
/// changed rather than the whole history again.
public struct TensorEntry: Codable, Sendable, Equatable {
    public var name: String
    public var shape: [Int]
    public var dtype: String
    /// Raw content size: shape × 4.
    public var bytes: Int
    public var parts: [TensorPart]
    /// sha256 of the raw contents: how a child version recognises this tensor as a prefix of its own.
    /// Absent in manifests written before it was recorded (their tensors are never extended).
    public var contentSHA256: String?

    /// Stored size of the blobs the tensor references (shared parts included).
    public var storedBytes: Int { parts.reduce(0) { $0 &+ $1.storedBytes } }

    public init(name: String, shape: [Int], dtype: String, bytes: Int, parts: [TensorPart], contentSHA256: String?) {
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.bytes = bytes
        self.parts = parts
        self.contentSHA256 = contentSHA256
    }

    enum CodingKeys: String, CodingKey {
        case name, shape, dtype, blob, bytes, parts
        case storedBytes = "stored_bytes"
        case contentSHA256 = "content_sha256"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        shape = try c.decode([Int].self, forKey: .shape)
        dtype = try c.decode(String.self, forKey: .dtype)
        bytes = try c.decode(Int.self, forKey: .bytes)
        contentSHA256 = try c.decodeIfPresent(String.self, forKey: .contentSHA256)
        if c.contains(.parts) {
            parts = try c.decode([TensorPart].self, forKey: .parts)
        } else {
            parts = [TensorPart(blob: try c.decode(String.self, forKey: .blob), bytes: bytes,
                                storedBytes: try c.decode(Int.self, forKey: .storedBytes))]
        }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        try c.encode(shape, forKey: .shape)
        try c.encode(dtype, forKey: .dtype)
        try c.encode(bytes, forKey: .bytes)
        try c.encodeIfPresent(contentSHA256, forKey: .contentSHA256)
        if parts.count == 1 {
            try c.encode(parts[0].blob, forKey: .blob)
            try c.encode(parts[0].storedBytes, forKey: .storedBytes)
        } else {
            try c.encode(parts, forKey: .parts)
        }
    }
}

extension TensorEntry {
    /// Reads the parts' blobs with `blob` (which checks each one's hash) and checks that each frame
    /// declares the size the manifest gives: a damaged entry fails here, before anything is allocated
    /// for its contents.
    func readParts(_ blob: (TensorPart) throws -> FileBytes) throws -> [FileBytes] {
        try parts.map { part in
            let stored = try blob(part)
            let declared: Int?
            do { declared = try BlobCodec.declaredContentSize(stored.buffer) } catch let e as BlobError {
                throw StoreError.corruptBlob(hash: part.blob, reason: "tensor '\(name)': \(e)")
            }
            guard declared == part.bytes else {
                throw StoreError.corruptBlob(hash: part.blob, reason: "tensor '\(name)': the frame holds \(declared.map(String.init) ?? "an unknown number of") bytes, the manifest says \(part.bytes)")
            }
            return stored
        }
    }

    /// Decodes blobs read by `readParts` into `out` (`bytes` long) and checks the contents' hash where
    /// the manifest records it.
    func decode(_ stored: [FileBytes], into out: UnsafeMutableRawPointer) throws {
        var offset = 0
        for (part, blob) in zip(parts, stored) {
            do {
                try BlobCodec.decode(blob.buffer, into: UnsafeMutableRawBufferPointer(start: out + offset, count: part.bytes))
            } catch let e as BlobError {
                throw StoreError.corruptBlob(hash: part.blob, reason: "tensor '\(name)': \(e)")
            }
            offset += part.bytes
        }
        if let expected = contentSHA256 {
            let actual = Hex.sha256(UnsafeRawBufferPointer(start: out, count: bytes))
            guard actual == expected else {
                throw StoreError.corruptBlob(hash: parts.last!.blob, reason: "tensor '\(name)': its contents hash to \(actual), the manifest says \(expected)")
            }
        }
    }
}

/// One stored file of a version (for example the edit log), raw bytes.
public struct FileEntry: Codable, Sendable, Equatable {
    public var name: String
    public var blob: String
    public var bytes: Int
    public var storedBytes: Int

    enum CodingKeys: String, CodingKey {
        case name, blob, bytes
        case storedBytes = "stored_bytes"
    }
}

/// Where an imported version came from.
public struct ManifestOrigin: Codable, Sendable, Equatable {
    /// The archive's file name.
    public var archive: String
    /// The version's number in the archive.
    public var version: Int

    public init(archive: String, version: Int) {
        self.archive = archive
        self.version = version
    }
}

/// A manifest's place in the version chain and its files, decoded without its tensor list (what walking
/// a chain of versions needs; the tensors' parts are most of a manifest's bytes and of its decoding).
public struct ManifestLink: Decodable, Sendable, Equatable {
    public let version: Int
    public let parent: Int?
    public let replayEdits: Int?
    public let blasThreads: Int?
    public let files: [FileEntry]

    enum CodingKeys: String, CodingKey {
        case version, parent, files
        case replayEdits = "replay_edits"
        case blasThreads = "blas_threads"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        version = try c.decode(Int.self, forKey: .version)
        parent = try c.decodeIfPresent(Int.self, forKey: .parent)
        replayEdits = try c.decodeIfPresent(Int.self, forKey: .replayEdits)
        blasThreads = try c.decodeIfPresent(Int.self, forKey: .blasThreads)
        files = try c.decodeIfPresent([FileEntry].self, forKey: .files) ?? []
    }

    static func decode(_ data: Data, path: String, expectedVersion: Int) throws -> ManifestLink {
        let link = try Manifest.json(ManifestLink.self, data, path: path)
        guard link.version == expectedVersion else {
            throw StoreError.badManifest(path: path, reason: "version \(link.version) in a file named for \(expectedVersion)")
        }
        return link
    }
}

/// An immutable version manifest: `versions/<8-digit version>.json`.
public struct Manifest: Codable, Sendable, Equatable {
    /// Format 1: every tensor one blob. Format 2 (written only when a tensor has several parts, so
    /// that an older dafnet refuses such a store instead of misreading it): tensors may have `parts`.
    public static let singleBlobFormat = "dafnet-checkpoint-manifest/1"
    public static let partsFormat = "dafnet-checkpoint-manifest/2"
    /// Format 3 (written only for a version that holds part of its state, `replay_edits`), so that an older
    /// dafnet refuses it instead of loading a state without the parts it would have to rebuild.
    public static let replayFormat = "dafnet-checkpoint-manifest/3"
    /// Format 4 (written only for a whole version that leaves out tensors its editor derives from the rest,
    /// `derived`), so that an older dafnet refuses it instead of loading a state without them.
    public static let derivedFormat = "dafnet-checkpoint-manifest/4"
    public static let tensorDType = "F32"

    public var format: String
    public var version: Int
    /// The version that was HEAD when this one was committed (nil for the first).
    public var parent: Int?
    /// SHA-256 of the parent's manifest file: changing any manifest of the chain (its parent, time,
    /// batch, info, …) breaks this record in its child, as HEAD's record and the commit's history
    /// record cover the newest. Absent in stores made before it was recorded.
    public var parentManifestSHA256: String?
    public var baseModelSHA256: String?
    public var editorSHA256: String?
    public var batch: BatchReference?
    /// ISO 8601 UTC time of the commit.
    public var created: String
    /// Sorted by the UTF-8 bytes of the name.
    public var tensors: [TensorEntry]
    public var files: [FileEntry]
    /// One hash over the whole edit state (`StateHash`): equal states give equal hashes in any store.
    public var stateSHA256: String
    /// Free-form JSON, such as the batch's evaluation.
    public var info: JSONValue?
    /// Set on versions imported from an archive into a store that already had versions.
    public var origin: ManifestOrigin?
    /// Set on a version that stores only what its editor cannot rebuild (`CommitRequest.replayEdits`): how
    /// many edits, from the nearest ancestor that holds its whole state (or from the empty state when no
    /// ancestor does), are applied again to rebuild the rest. nil: the version holds its whole state.
    public var replayEdits: Int?
    /// The OpenBLAS thread count the version's batch was applied with: OpenBLAS sums some products
    /// differently at one and at two threads, so a replay of the batch runs at this count to repeat it bit for
    /// bit. Absent in versions made before it was recorded (replayed at the current count), and on versions
    /// no batch made.
    public var blasThreads: Int?
    /// Set on a whole version that leaves out tensors of its state which the editor that made it computes
    /// from the rest (`CommitRequest.derived`; DAFNet and MEND with `least_squares`: `delta_weight.*`, the
    /// solution of the stored sums' system): their names. nil on every other version.
    public var derived: [String]?

    enum CodingKeys: String, CodingKey {
        case format, version, parent, batch, created, tensors, files, info, origin, derived
        case baseModelSHA256 = "base_model_sha256"
        case editorSHA256 = "editor_sha256"
        case stateSHA256 = "state_sha256"
        case parentManifestSHA256 = "parent_manifest_sha256"
        case replayEdits = "replay_edits"
        case blasThreads = "blas_threads"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        format = try c.decode(String.self, forKey: .format)
        version = try c.decode(Int.self, forKey: .version)
        parent = try c.decodeIfPresent(Int.self, forKey: .parent)
        parentManifestSHA256 = try c.decodeIfPresent(String.self, forKey: .parentManifestSHA256)
        baseModelSHA256 = try c.decodeIfPresent(String.self, forKey: .baseModelSHA256)
        editorSHA256 = try c.decodeIfPresent(String.self, forKey: .editorSHA256)
        batch = try c.decodeIfPresent(BatchReference.self, forKey: .batch)
        created = try c.decode(String.self, forKey: .created)
        tensors = try c.decode([TensorEntry].self, forKey: .tensors)
        files = try c.decodeIfPresent([FileEntry].self, forKey: .files) ?? []
        stateSHA256 = try c.decode(String.self, forKey: .stateSHA256)
        info = try c.decodeIfPresent(JSONValue.self, forKey: .info)
        origin = try c.decodeIfPresent(ManifestOrigin.self, forKey: .origin)
        replayEdits = try c.decodeIfPresent(Int.self, forKey: .replayEdits)
        blasThreads = try c.decodeIfPresent(Int.self, forKey: .blasThreads)
        derived = try c.decodeIfPresent([String].self, forKey: .derived)
    }

    init(version: Int, parent: Int?, parentManifestSHA256: String?, baseModelSHA256: String?, editorSHA256: String?, batch: BatchReference?,
         created: String, tensors: [TensorEntry], files: [FileEntry], stateSHA256: String, info: JSONValue?,
         origin: ManifestOrigin? = nil, replayEdits: Int? = nil, blasThreads: Int? = nil, derived: [String]? = nil) {
        self.format = replayEdits != nil ? Self.replayFormat : derived != nil ? Self.derivedFormat
            : tensors.contains { $0.parts.count != 1 } ? Self.partsFormat : Self.singleBlobFormat
        self.version = version
        self.parent = parent
        self.parentManifestSHA256 = parentManifestSHA256
        self.baseModelSHA256 = baseModelSHA256
        self.editorSHA256 = editorSHA256
        self.batch = batch
        self.created = created
        self.tensors = tensors
        self.files = files
        self.stateSHA256 = stateSHA256
        self.info = info
        self.origin = origin
        self.replayEdits = replayEdits
        self.blasThreads = blasThreads
        self.derived = derived
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(format, forKey: .format)
        try c.encode(version, forKey: .version)
        if let parent { try c.encode(parent, forKey: .parent) } else { try c.encodeNil(forKey: .parent) }
        try c.encodeIfPresent(parentManifestSHA256, forKey: .parentManifestSHA256)
        if let baseModelSHA256 { try c.encode(baseModelSHA256, forKey: .baseModelSHA256) } else { try c.encodeNil(forKey: .baseModelSHA256) }
        if let editorSHA256 { try c.encode(editorSHA256, forKey: .editorSHA256) } else { try c.encodeNil(forKey: .editorSHA256) }
        if let batch { try c.encode(batch, forKey: .batch) } else { try c.encodeNil(forKey: .batch) }
        try c.encode(created, forKey: .created)
        try c.encode(tensors, forKey: .tensors)
        try c.encode(files, forKey: .files)
        try c.encode(stateSHA256, forKey: .stateSHA256)
        if let info { try c.encode(info, forKey: .info) } else { try c.encodeNil(forKey: .info) }
        try c.encodeIfPresent(origin, forKey: .origin)
        try c.encodeIfPresent(replayEdits, forKey: .replayEdits)
        try c.encodeIfPresent(blasThreads, forKey: .blasThreads)
        try c.encodeIfPresent(derived, forKey: .derived)
    }

    /// The manifest as stored: pretty-printed JSON with sorted keys and a final newline.
    public func encoded() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        var data = try encoder.encode(self)
        data.append(UInt8(ascii: "\n"))
        return data
    }

    /// Parses and validates manifest bytes; `expectedVersion` is the number in the file name.
    static func decode(_ data: Data, path: String, expectedVersion: Int?) throws -> Manifest {
        let manifest = try json(Manifest.self, data, path: path)
        if let reason = manifest.validationProblem(expectedVersion: expectedVersion) {
            throw StoreError.badManifest(path: path, reason: reason)
        }
        return manifest
    }

    /// Manifest bytes decoded as `type` (the whole manifest or a part of it), or `badManifest`.
    static func json<T: Decodable>(_ type: T.Type, _ data: Data, path: String) throws -> T {
        do {
            return try JSONDecoder().decode(type, from: data)
        } catch {
            throw StoreError.badManifest(path: path, reason: "not a valid manifest JSON (\(decodingSummary(error)))")
        }
    }

    /// Every blob hash the version references.
    public var blobs: Set<String> { Set(tensors.flatMap { $0.parts.map(\.blob) } + files.map(\.blob)) }

    /// The first structural problem, or nil.
    func validationProblem(expectedVersion: Int?) -> String? {
        guard [Self.singleBlobFormat, Self.partsFormat, Self.replayFormat, Self.derivedFormat].contains(format) else {
            return "unknown format '\(format)'"
        }
        if let r = replayEdits, r < 1 { return "replay_edits \(r) is not positive" }
        if let n = blasThreads, n < 1 { return "blas_threads \(n) is not positive" }
        if (replayEdits != nil) != (format == Self.replayFormat) { return "replay_edits and format '\(format)' disagree" }
        if (derived != nil) != (format == Self.derivedFormat) { return "derived and format '\(format)' disagree" }
        if let derived, let problem = Self.derivedProblem(derived, stored: Set(tensors.map(\.name)), replayEdits: replayEdits) { return problem }
        guard version >= 1 else { return "version \(version) is not positive" }
        if let expectedVersion, expectedVersion != version {
            return "the file is named for version \(expectedVersion) but holds version \(version)"
        }
        if let parent, !(parent >= 1 && parent < version) { return "parent \(parent) is not an earlier version" }
        if parentManifestSHA256 != nil && parent == nil { return "parent_manifest_sha256 without a parent" }
        for (label, hash) in [("base_model_sha256", baseModelSHA256), ("editor_sha256", editorSHA256), ("batch.sha256", batch?.sha256),
                              ("parent_manifest_sha256", parentManifestSHA256)] {
            if let hash, !Hex.isSHA256(hash) { return "\(label) is not a sha256 hex string" }
        }
        guard Hex.isSHA256(stateSHA256) else { return "state_sha256 is not a sha256 hex string" }
        var names = Set<String>()
        for t in tensors {
            guard !t.name.isEmpty, names.insert(t.name).inserted else { return "tensor name '\(t.name)' is empty or repeated" }
            guard t.dtype == Self.tensorDType else { return "tensor '\(t.name)' has dtype \(t.dtype), only F32 is stored" }
            guard !t.parts.isEmpty, format != Self.singleBlobFormat || t.parts.count == 1 else { return "tensor '\(t.name)' has \(t.parts.count) parts" }
            for part in t.parts {
                guard Hex.isSHA256(part.blob) else { return "tensor '\(t.name)' names blob '\(part.blob)', not a sha256" }
                guard part.bytes >= 0, part.bytes % 4 == 0 else { return "tensor '\(t.name)': a part of \(part.bytes) bytes" }
                guard part.storedBytes >= BlobCodec.headerSize else { return "tensor '\(t.name)': stored_bytes \(part.storedBytes) too small" }
            }
            if let h = t.contentSHA256, !Hex.isSHA256(h) { return "tensor '\(t.name)': content_sha256 is not a sha256 hex string" }
            var n = 1
            for d in t.shape {
                guard d >= 0 else { return "tensor '\(t.name)' has a negative dimension" }
                let (p, o) = n.multipliedReportingOverflow(by: d)
                guard !o else { return "tensor '\(t.name)' shape overflows" }
                n = p
            }
            let (bytes, o) = n.multipliedReportingOverflow(by: 4)
            guard !o, bytes == t.bytes else { return "tensor '\(t.name)': shape \(t.shape) does not match \(t.bytes) bytes" }
            // Parts are non-negative (checked above); comparing with what is left cannot overflow.
            var total = 0
            for part in t.parts {
                guard part.bytes <= t.bytes - total else { return "tensor '\(t.name)': its parts do not add up to \(t.bytes) bytes" }
                total += part.bytes
            }
            guard total == t.bytes else { return "tensor '\(t.name)': its parts do not add up to \(t.bytes) bytes" }
        }
        guard zip(tensors, tensors.dropFirst()).allSatisfy({ Self.precedes($0.name, $1.name) }) else {
            return "tensors are not sorted by name"
        }
        var fileNames = Set<String>()
        for f in files {
            guard !f.name.isEmpty, fileNames.insert(f.name).inserted else { return "file name '\(f.name)' is empty or repeated" }
            guard Hex.isSHA256(f.blob) else { return "file '\(f.name)' names blob '\(f.blob)', not a sha256" }
            guard f.bytes >= 0, f.storedBytes >= BlobCodec.headerSize else { return "file '\(f.name)' has bad sizes" }
        }
        return nil
    }

    /// What is wrong with a list of derived tensor names (`Manifest.derived`), or nil: it must name at least
    /// one tensor, each once, none of them stored, and only on a version that holds its whole state.
    static func derivedProblem(_ derived: [String], stored: Set<String>, replayEdits: Int?) -> String? {
        if derived.isEmpty { return "derived names no tensor" }
        if replayEdits != nil { return "derived on a version stored in part (replay_edits)" }
        var seen = Set<String>()
        for name in derived {
            guard !name.isEmpty, !name.contains("\0"), seen.insert(name).inserted else { return "derived tensor name '\(name)' is empty or repeated" }
            if stored.contains(name) { return "derived tensor '\(name)' is also stored" }
        }
        return nil
    }

    /// Whether loading the version's whole state needs the editor that made it: to replay batches
    /// (`replayEdits`) or to compute `derived` tensors.
    public var needsEditor: Bool { replayEdits != nil || derived != nil }

    /// The canonical name order: UTF-8 bytes.
    public static func precedes(_ a: String, _ b: String) -> Bool {
        a.utf8.lexicographicallyPrecedes(b.utf8)
    }

    static func decodingSummary(_ error: Error) -> String {
        guard let e = error as? DecodingError else { return "\(error)" }
        func path(_ c: DecodingError.Context) -> String {
            c.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
        }
        switch e {
        case .keyNotFound(let key, let c): return "missing '\(key.stringValue)' at '\(path(c))'"
        case .typeMismatch(_, let c): return "wrong type at '\(path(c))'"
        case .valueNotFound(_, let c): return "null at '\(path(c))'"
        case .dataCorrupted(let c): return c.codingPath.isEmpty ? "malformed JSON" : "bad value at '\(path(c))'"
        @unknown default: return "\(e)"
        }
    }
}

extension Manifest {
    /// `versions/NNNNNNNN.json`, the manifest's path in a store.
    public static func fileName(_ version: Int) -> String { "versions/" + String(format: "%08d", version) + ".json" }

    /// Throws `baseModelMismatch` when the version records a base model other than `given` (the
    /// SHA-256 of a model folder's weights); nothing is checked where either is unknown.
    public func requireBaseModel(_ given: String?) throws {
        if let stored = baseModelSHA256, let given, stored != given {
            throw StoreError.baseModelMismatch(version: version, stored: stored, given: given)
        }
    }
}

/// A version named on the command line or in code: a number, `HEAD`, or `HEAD~K` (K parents back).
public enum VersionRef: Sendable, Equatable, CustomStringConvertible {
    case head
    case headMinus(Int)
    case number(Int)

    public init(parsing text: String) throws {
        let t = text.trimmingCharacters(in: .whitespaces)
        if t.uppercased() == "HEAD" {
            self = .head
        } else if t.uppercased().hasPrefix("HEAD~"), let k = Int(t.dropFirst(5)), k >= 0 {
            self = k == 0 ? .head : .headMinus(k)
        } else if let n = Int(t), n >= 1 {
            self = .number(n)
        } else {
            throw StoreError.invalidVersionReference(text)
        }
    }

    public var description: String {
        switch self {
        case .head: return "HEAD"
        case .headMinus(let k): return "HEAD~\(k)"
        case .number(let n): return "\(n)"
        }
    }
}

/// One line of `history.jsonl`: every move of HEAD (commit, rollback, import, recovery) and every
/// gc, appended in order and never rewritten.
/// What a `history.jsonl` record did to the store.
public enum HistoryOperation: String, Codable, Sendable, CaseIterable {
    case commit, rollback, `import`, gc, recover, repair
}

public struct HistoryRecord: Codable, Sendable, Equatable {
    public var time: String
    public var op: HistoryOperation
    /// HEAD after the operation.
    public var version: Int?
    /// HEAD before the operation.
    public var from: Int?
    /// commit: the batch name; import: the archive.
    public var source: String?
    /// import: the versions created; gc: the versions removed.
    public var versions: [Int]?
    /// commit: SHA-256 of the new version's manifest file (so a version no child or HEAD covers is
    /// covered too).
    public var manifestSHA256: String?

    enum CodingKeys: String, CodingKey {
        case time, op, version, from, source, versions
        case manifestSHA256 = "manifest_sha256"
    }

    public init(op: HistoryOperation, version: Int?, from: Int?, source: String? = nil, versions: [Int]? = nil, manifestSHA256: String? = nil) {
        self.time = Timestamp.now()
        self.op = op
        self.version = version
        self.from = from
        self.source = source
        self.versions = versions
        self.manifestSHA256 = manifestSHA256
    }
}

/// The canonical hash of an edit state (`state_sha256`): SHA-256 over
/// `"dafnet-state/1\n"`, then for each tensor in UTF-8 name order: the name's byte length (u64 LE),
/// the name, the rank (u64 LE), each dimension (u64 LE), then the values as little-endian Float32
/// bit patterns. Independent of compression, blob layout and store; files are not included.
public struct StateHasher {
    private var hasher = SHA256()
    private var lastName: String?

    public init() {
        hasher.update(data: Array("dafnet-state/1\n".utf8))
    }

    private mutating func u64(_ v: Int) {
        var x = UInt64(v).littleEndian
        withUnsafeBytes(of: &x) { hasher.update(bufferPointer: $0) }
    }

    /// Adds one tensor; tensors must come in `Manifest.precedes` order.
    public mutating func add(name: String, shape: [Int], values: UnsafeRawBufferPointer) {
        precondition(lastName.map { Manifest.precedes($0, name) } ?? true, "state hash: tensors out of order")
        lastName = name
        let utf8 = Array(name.utf8)
        u64(utf8.count)
        hasher.update(data: utf8)
        u64(shape.count)
        for d in shape { u64(d) }
        hasher.update(bufferPointer: values)
    }

    public func finalize() -> String { Hex.string(hasher.finalize()) }
}

enum Hex {
    static func string<D: Sequence>(_ bytes: D) -> String where D.Element == UInt8 {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(64)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func isSHA256(_ s: String) -> Bool {
        s.utf8.count == 64 && s.utf8.allSatisfy { ($0 >= 48 && $0 <= 57) || ($0 >= 97 && $0 <= 102) }
    }

    static func sha256(_ buffer: UnsafeRawBufferPointer) -> String {
        var h = SHA256()
        h.update(bufferPointer: buffer)
        return string(h.finalize())
    }

    static func sha256(_ data: Data) -> String {
        data.withUnsafeBytes { sha256($0) }
    }
}

/// SHA-256 of files, for base-model and editor hashes.
public enum FileHash {
    /// Hex sha256 of a file's bytes, read in 4 MiB chunks.
    public static func sha256(ofFileAt url: URL) throws -> String {
        let (fd, _) = try storeIO { try FileBytes.openRegular(url.path) }
        defer { close(fd) }
        var h = SHA256()
        let chunk = UnsafeMutableRawPointer.allocate(byteCount: 1 << 22, alignment: 64)
        defer { chunk.deallocate() }
        while true {
            let n = Glibc_read(fd, chunk, 1 << 22)
            if n < 0 {
                if errno == EINTR { continue }
                throw StoreError.io(FileIOError("read", url.path))
            }
            if n == 0 { break }
            h.update(bufferPointer: UnsafeRawBufferPointer(start: chunk, count: n))
        }
        return Hex.string(h.finalize())
    }
}

/// The one timestamp spelling of every file the tool writes: ISO 8601, UTC, with fractional seconds.
public enum Timestamp {
    public static func now(_ date: Date = Date()) -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        f.timeZone = TimeZone(identifier: "UTC")
        return f.string(from: date)
    }
}
