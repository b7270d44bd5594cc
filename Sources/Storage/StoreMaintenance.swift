import Foundation
import TensorCore

/// The result of `CheckpointStore.verify()`.
public struct VerificationReport: Codable, Sendable {
    /// Corruption: anything here makes `checkpoints verify` fail.
    public var problems: [String] = []
    /// Worth knowing but harmless (a stray file, an unreferenced blob, a parent removed by gc).
    public var warnings: [String] = []
    public var checkedBlobs = 0
    public var checkedVersions = 0

    public var isClean: Bool { problems.isEmpty }
}

/// The result of `CheckpointStore.gc(keep:)`.
public struct GCReport: Codable, Sendable {
    public var removedVersions: [Int] = []
    public var removedBlobs: [String] = []
    public var freedBytes = 0
    public var keptVersions: [Int] = []
}

/// How one tensor differs between two versions.
public struct TensorDifference: Codable, Sendable, Equatable {
    public enum Status: String, Codable, Sendable {
        case added, removed, changed, unchanged, reshaped
    }

    public var name: String
    public var status: Status
    public var shapeA: [Int]?
    public var shapeB: [Int]?
    /// max |b − a| (same shapes only).
    public var maxAbsDifference: Double?
    /// ‖b − a‖ (Frobenius; same shapes only).
    public var differenceNorm: Double?
    public var normA: Double?
    public var normB: Double?
}

/// One line of `checkpoints list`.
public struct VersionSummary: Codable, Sendable {
    public var version: Int
    public var parent: Int?
    public var isHead: Bool
    public var created: String?
    public var tensors: Int?
    public var rawBytes: Int?
    public var storedBytes: Int?
    /// Stored size of the blobs the version references and its parent does not: what committing it
    /// added to the store (all of `storedBytes` for a root, or when the parent is gone).
    public var newBytes: Int?
    public var batch: String?
    public var stateSHA256: String?
    /// `Manifest.replayEdits`: nil for a version that stores its whole state.
    public var replayEdits: Int?
    /// Set when the manifest cannot be read.
    public var problem: String?
}

extension CheckpointStore {
    /// One summary per version, ascending; an unreadable manifest gives a row with `problem` set.
    public func summaries() throws -> [VersionSummary] {
        let h = try? head()
        let all = try versions()
        let manifests = Dictionary(uniqueKeysWithValues: all.compactMap { v in (try? manifest(v)).map { (v, $0) } })
        return all.map { v in
            do {
                let m = try manifests[v] ?? manifest(v)
                let parentBlobs = m.parent.flatMap { manifests[$0] }?.blobs ?? []
                var sizes: [String: Int] = [:]
                for t in m.tensors { for p in t.parts { sizes[p.blob] = p.storedBytes } }
                for f in m.files { sizes[f.blob] = f.storedBytes }
                return VersionSummary(version: v, parent: m.parent, isHead: v == h, created: m.created,
                                      tensors: m.tensors.count,
                                      rawBytes: m.tensors.reduce(0) { $0 + $1.bytes } + m.files.reduce(0) { $0 + $1.bytes },
                                      storedBytes: m.tensors.reduce(0) { $0 + $1.storedBytes } + m.files.reduce(0) { $0 + $1.storedBytes },
                                      newBytes: sizes.filter { !parentBlobs.contains($0.key) }.values.reduce(0, +),
                                      batch: m.batch?.name, stateSHA256: m.stateSHA256, replayEdits: m.replayEdits, problem: nil)
            } catch {
                return VersionSummary(version: v, parent: nil, isHead: v == h, problem: "\(error)")
            }
        }
    }

    /// Re-hashes every blob, decodes every frame, reads every manifest and recomputes each version's
    /// `state_sha256`, under the store lock (shared: verifies run beside each other and on a read-only
    /// store). Never throws for corruption: it lands in `problems`.
    public func verify() throws -> VerificationReport {
        try withLock(shared: true) { verifyLocked() }
    }

    func verifyLocked() -> VerificationReport {
        var report = VerificationReport()
        let h: Int?
        do {
            h = try head()
        } catch {
            report.problems.append("\(error)")
            h = nil
        }
        if let h, !FileUtil.exists(manifestPath(h)) {
            report.problems.append("HEAD names version \(h), which has no manifest")
        }
        // The chain of manifest hashes: HEAD's record, each child's, each commit's.
        var covered = Set<Int>()
        if let h, let record = try? headRecord(), let expected = record.manifestSHA256 {
            covered.insert(h)
            if let data = try? manifestData(h), Hex.sha256(data) != expected {
                report.problems.append("\(StoreError.manifestChanged(version: h, recordedBy: "HEAD", expected: expected, actual: Hex.sha256(data)))")
            }
        }
        if let records = try? manifestRecords() {
            for (v, list) in records.sorted(by: { $0.key < $1.key }) {
                guard let data = try? manifestData(v) else { continue }
                covered.insert(v)
                let actual = Hex.sha256(data)
                for r in list where r.sha256 != actual {
                    report.problems.append("\(StoreError.manifestChanged(version: v, recordedBy: r.by, expected: r.sha256, actual: actual))")
                }
            }
        }
        // Blobs: hash and frame.
        var good = Set<String>()
        var blobNames: [String] = []
        do {
            blobNames = try FileUtil.list(objectsPath)
        } catch {
            report.problems.append("\(error)")
        }
        for name in blobNames {
            guard Hex.isSHA256(name) else {
                report.warnings.append("objects/\(name): not a blob name (stray file)")
                continue
            }
            report.checkedBlobs += 1
            do {
                let bytes = try readVerifiedBlob(name)
                _ = try BlobCodec.decode(bytes.buffer, limit: configuration.maxBlobBytes)
                good.insert(name)
            } catch let e as BlobError {
                report.problems.append("objects/\(name): \(e)")
            } catch {
                report.problems.append("\(error)")
            }
        }
        // Manifests: structure, blobs, sizes, state hash.
        var referenced = Set<String>()
        var all: [Int] = []
        do {
            all = try versions()
            for name in try FileUtil.list(versionsPath) where Self.versionNumber(fileName: name) == nil {
                report.warnings.append("versions/\(name): not a manifest name (stray file)")
            }
        } catch {
            report.problems.append("\(error)")
        }
        for v in all where !covered.contains(v) {
            report.warnings.append("\(Manifest.fileName(v)): no record of its hash covers it (made before the chain was recorded)")
        }
        for v in all {
            report.checkedVersions += 1
            let m: Manifest
            do {
                m = try manifest(v)
            } catch {
                report.problems.append("\(error)")
                continue
            }
            referenced.formUnion(m.blobs)
            if let p = m.parent, !FileUtil.exists(manifestPath(p)) {
                if m.replayEdits != nil {
                    report.problems.append("version \(v): parent \(p), which its state is rebuilt from, is missing")
                } else {
                    report.warnings.append("version \(v): parent \(p) is no longer in the store (removed by gc)")
                }
            }
            let stored = m.tensors.flatMap { t in t.parts.map { (t.name, $0.blob, $0.storedBytes) } } + m.files.map { ($0.name, $0.blob, $0.storedBytes) }
            for (name, blob, _) in stored where !blobExists(blob) {
                report.problems.append("version \(v): blob \(blob) of '\(name)' is missing")
            }
            for (name, blob, size) in stored where FileUtil.fileSize(blobPath(blob)).map({ $0 != size }) ?? false {
                report.problems.append("version \(v): blob \(blob) of '\(name)' is \(FileUtil.fileSize(blobPath(blob)) ?? 0) bytes, the manifest says \(size)")
            }
            do {
                _ = try load(.number(v))
            } catch {
                report.problems.append("version \(v): \(error)")
            }
        }
        for name in good.subtracting(referenced).sorted() {
            report.warnings.append("objects/\(name): referenced by no manifest")
        }
        // Leftovers and history.
        for dir in [rootPath, objectsPath, versionsPath] {
            for name in (try? FileUtil.list(dir)) ?? [] where name.hasPrefix(Self.tempPrefix) {
                report.warnings.append("\(dir)/\(name): temporary file of an interrupted operation")
            }
        }
        if let data = try? FileUtil.read(historyPath) {
            let decoder = JSONDecoder()
            for (i, line) in data.split(separator: UInt8(ascii: "\n")).enumerated()
            where (try? decoder.decode(HistoryRecord.self, from: Data(line))) == nil {
                report.warnings.append("history.jsonl line \(i + 1): unreadable record")
            }
        }
        return report
    }

    /// Removes unreferenced blobs, under the store lock. With `keep`, first removes the manifests of
    /// all versions except HEAD and the `keep` newest (their evaluation folders stay). Refuses to run
    /// when a manifest cannot be read, so a damaged manifest never costs its blobs.
    @discardableResult
    public func gc(keep: Int? = nil) throws -> GCReport {
        if let keep, keep < 0 { throw StoreError.gcRefused("--keep must be at least 0") }
        return try withLock {
            var report = GCReport()
            let all = try versions()
            let h = try head()
            var manifests: [Int: Manifest] = [:]
            for v in all {
                do {
                    manifests[v] = try manifest(v)
                } catch {
                    throw StoreError.gcRefused("\(error); run `checkpoints verify`")
                }
            }
            var kept = Set(all)
            if let keep {
                kept = Set(all.suffix(keep))
                if let h { kept.insert(h) }
                // A version that is rebuilt by replay keeps the versions it is rebuilt from.
                for v in kept {
                    var m = manifests[v]!
                    while m.replayEdits != nil, let p = m.parent, let pm = manifests[p] {
                        kept.insert(p)
                        m = pm
                    }
                }
            }
            report.keptVersions = kept.sorted()
            let referenced = kept.reduce(into: Set<String>()) { $0.formUnion(manifests[$1]!.blobs) }
            try storeIO {
                let removedVersions = all.filter { !kept.contains($0) }
                for v in removedVersions { try fileSystem.removeFile(atPath: manifestPath(v)) }
                if !removedVersions.isEmpty { try fileSystem.syncDirectory(atPath: versionsPath) }
                report.removedVersions = removedVersions
                for name in try FileUtil.list(objectsPath) where Hex.isSHA256(name) && !referenced.contains(name) {
                    report.freedBytes += FileUtil.fileSize(blobPath(name)) ?? 0
                    try fileSystem.removeFile(atPath: blobPath(name))
                    report.removedBlobs.append(name)
                }
                if !report.removedBlobs.isEmpty { try fileSystem.syncDirectory(atPath: objectsPath) }
                if !report.removedVersions.isEmpty || !report.removedBlobs.isEmpty {
                    try appendHistory(HistoryRecord(op: .gc, version: h, from: h, versions: report.removedVersions))
                }
            }
            return report
        }
    }

    /// Per-tensor differences from version `a` to version `b` (both verified while read).
    public func diff(_ a: VersionRef, _ b: VersionRef) throws -> [TensorDifference] {
        Self.diff(try load(a).tensors, try load(b).tensors)
    }

    /// Per-tensor changes from the tensors `va` to `vb` (two states however they were read or rebuilt).
    public static func diff(_ va: [String: Tensor], _ vb: [String: Tensor]) -> [TensorDifference] {
        let names = Set(va.keys).union(vb.keys).sorted(by: Manifest.precedes)
        return names.map { name in
            switch (va[name], vb[name]) {
            case let (ta?, tb?):
                var d = TensorDifference(name: name, status: .changed, shapeA: ta.shape, shapeB: tb.shape,
                                         normA: Self.norm(ta), normB: Self.norm(tb))
                if ta.shape != tb.shape {
                    d.status = .reshaped
                    return d
                }
                var maxAbs = 0.0, sum = 0.0
                let pa = ta.data, pb = tb.data
                for i in 0..<ta.count {
                    let x = Double(pb[i]) - Double(pa[i])
                    maxAbs = max(maxAbs, abs(x))
                    sum += x * x
                }
                let bitwiseEqual = memcmp(pa, pb, ta.count * 4) == 0
                d.maxAbsDifference = maxAbs
                d.differenceNorm = sum.squareRoot()
                d.status = bitwiseEqual ? .unchanged : .changed
                return d
            case let (ta?, nil):
                return TensorDifference(name: name, status: .removed, shapeA: ta.shape, normA: Self.norm(ta))
            case let (nil, tb?):
                return TensorDifference(name: name, status: .added, shapeB: tb.shape, normB: Self.norm(tb))
            case (nil, nil):
                return TensorDifference(name: name, status: .unchanged)
            }
        }
    }

    static func norm(_ t: Tensor) -> Double {
        var sum = 0.0
        let p = t.data
        for i in 0..<t.count { sum += Double(p[i]) * Double(p[i]) }
        return sum.squareRoot()
    }
}
