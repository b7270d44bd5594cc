import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `dafnet-archive/archive.json`: what an archive holds, with the hashes restore checks.
public struct ArchiveIndex: Codable, Sendable {
    public static let currentFormat = "dafnet-checkpoint-archive/1"

    public struct FileRecord: Codable, Sendable {
        public var path: String
        public var sha256: String
        public var bytes: Int
    }

    public var format: String
    public var created: String
    /// The archived version.
    public var version: Int
    /// The chain of versions that lead to it (following parents while they are in the store), ascending.
    public var versions: [Int]
    /// sha256 of each manifest file, keyed by version number.
    public var manifests: [String: String]
    /// Every blob the chain references.
    public var objects: [String]
    /// Files under `evaluations/` (paths relative to the archive root folder).
    public var evaluations: [FileRecord]
    /// The base model's folder name and files under `model/`, when included.
    public var modelName: String?
    public var model: [FileRecord]

    enum CodingKeys: String, CodingKey {
        case format, created, version, versions, manifests, objects, evaluations, model
        case modelName = "model_name"
    }
}

/// What `CheckpointArchive.create` wrote.
public struct ArchiveCreateReport: Sendable {
    public var path: String
    public var version: Int
    public var versions: [Int]
    public var objects: Int
    public var evaluationFiles: Int
    public var modelFiles: Int
    public var archiveBytes: Int
    /// The archive file's SHA-256 (also in `F.sha256`).
    public var sha256: String
}

/// What `CheckpointArchive.restore` imported.
public struct ArchiveRestoreReport: Sendable {
    /// Archive version → version number in the store.
    public var versionMap: [Int: Int]
    /// The store's version for the archived version.
    public var restoredVersion: Int
    /// Whether HEAD moved to it (only when the store had no version).
    public var headMoved: Bool
    /// Whether the archive matched its `.sha256` file (false: there was none beside it).
    public var checksumVerified: Bool
    public var blobsAdded: Int
    /// Where the base-model files went, if the archive had them.
    public var modelDirectory: String?
}

/// Archives of checkpoint versions: `.tar.zst`, pax format, everything under `dafnet-archive/`:
/// `archive.json` (the index), `versions/NNNNNNNN.json`, `objects/<sha256>`,
/// `evaluations/vNNNNNNNN/…` and optionally `model/…` (the base model's files).
public enum CheckpointArchive {
    public static let rootFolder = "dafnet-archive"

    /// Writes version `ref`, the chain of its ancestors still in the store, their blobs and
    /// evaluation files, and optionally the files of `includeModel`, to `url` (atomically). Every
    /// version is verified before it is archived.
    @discardableResult
    public static func create(store: CheckpointStore, version ref: VersionRef, to url: URL, includeModel: URL? = nil,
                              compressionLevel: Int32 = 3) throws -> ArchiveCreateReport {
        let version = try store.resolve(ref)
        _ = try store.replayChain(of: version)  // what it is rebuilt from must be there to go with it
        var chain: [Int] = [version]
        while let p = try store.manifest(chain.last!).parent, FileUtil.exists(store.manifestPath(p)) {
            chain.append(p)
        }
        chain.reverse()
        var manifestData: [Int: Data] = [:]
        var objects = Set<String>()
        for v in chain {
            _ = try store.load(.number(v))
            let data = try store.manifestData(v)
            manifestData[v] = data
            objects.formUnion(try store.manifest(v).blobs)
        }
        var evaluations: [(record: ArchiveIndex.FileRecord, source: String)] = []
        for v in chain {
            let dir = store.evaluationsDirectory(for: v).path
            guard FileUtil.isDirectory(dir) else { continue }
            for rel in try storeIO({ try FileUtil.regularFiles(under: dir) }) {
                let source = dir + "/" + rel
                let hash = try FileHash.sha256(ofFileAt: URL(fileURLWithPath: source))
                let path = "evaluations/" + String(format: "v%08d", v) + "/" + rel
                evaluations.append((.init(path: path, sha256: hash, bytes: FileUtil.fileSize(source) ?? 0), source))
            }
        }
        var model: [(record: ArchiveIndex.FileRecord, source: String)] = []
        var modelName: String?
        if let includeModel {
            let dir = includeModel.standardizedFileURL.path
            guard FileUtil.isDirectory(dir) || (FileUtil.kind(dir) == S_IFLNK) else {
                throw StoreError.io(FileIOError("open model folder", dir, code: ENOTDIR))
            }
            modelName = includeModel.standardizedFileURL.lastPathComponent
            for rel in try storeIO({ try FileUtil.regularFiles(under: dir, followLinks: true) }) {
                let source = dir + "/" + rel
                let hash = try FileHash.sha256(ofFileAt: URL(fileURLWithPath: source))
                var st = stat()
                stat(source, &st)
                model.append((.init(path: "model/" + rel, sha256: hash, bytes: Int(st.st_size)), source))
            }
        }
        let index = ArchiveIndex(
            format: ArchiveIndex.currentFormat, created: Timestamp.now(), version: version, versions: chain,
            manifests: Dictionary(uniqueKeysWithValues: manifestData.map { (String($0.key), Hex.sha256($0.value)) }),
            objects: objects.sorted(), evaluations: evaluations.map(\.record), modelName: modelName, model: model.map(\.record))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let indexData = try encoder.encode(index)

        let out = url.standardizedFileURL.path
        let dir = (out as NSString).deletingLastPathComponent
        let temp = (dir.isEmpty ? "." : dir) + "/.tmp-" + (out as NSString).lastPathComponent + "-" + FileUtil.randomSuffix()
        do {
            let writer = try TarArchiveWriter(path: temp, compression: .zstd(level: compressionLevel))
            let r = rootFolder + "/"
            try writer.addFile(r + "archive.json", data: indexData)
            for v in chain { try writer.addFile(r + Manifest.fileName(v), data: manifestData[v]!) }
            for hash in objects.sorted() { try writer.addFile(r + "objects/" + hash, contentsOf: store.blobPath(hash)) }
            for e in evaluations { try writer.addFile(r + e.record.path, contentsOf: e.source) }
            for m in model { try writer.addFile(r + m.record.path, contentsOf: m.source) }
            try writer.finish()
            try storeIO {
                let fs = POSIXFileSystem()
                try fs.syncFile(atPath: temp)
                try fs.rename(atPath: temp, toPath: out)
                try fs.syncDirectory(atPath: dir.isEmpty ? "." : dir)
            }
        } catch {
            unlink(temp)
            throw error
        }
        // The archive's own hash beside it (`sha256sum` format): archive.json records every other
        // file's hash, and this records archive.json's.
        let sha = try FileHash.sha256(ofFileAt: URL(fileURLWithPath: out))
        let line = Data("\(sha)  \((out as NSString).lastPathComponent)\n".utf8)
        try storeIO { try AtomicFile.write(to: out + checksumSuffix) { fd in try line.withUnsafeBytes { try POSIXFileSystem.writeAll(fd: fd, $0, path: out) } } }
        return ArchiveCreateReport(path: out, version: version, versions: chain, objects: objects.count,
                                   evaluationFiles: evaluations.count, modelFiles: model.count,
                                   archiveBytes: FileUtil.fileSize(out) ?? 0, sha256: sha)
    }

    /// `F.tar.zst.sha256`, written beside every archive.
    public static let checksumSuffix = ".sha256"

    /// Checks an archive against its `.sha256` file when there is one. Returns whether it was checked.
    static func checkChecksum(_ path: String) throws -> Bool {
        guard FileUtil.exists(path + checksumSuffix) else { return false }
        let text = String(decoding: try storeIO { try FileUtil.read(path + checksumSuffix, limit: 4096) }, as: UTF8.self)
        guard let recorded = text.split(separator: " ").first.map(String.init), Hex.isSHA256(recorded) else {
            throw ArchiveError.invalidArchive("\(path)\(checksumSuffix) does not hold a sha256")
        }
        let actual = try FileHash.sha256(ofFileAt: URL(fileURLWithPath: path))
        guard actual == recorded else { throw ArchiveError.hashMismatch(path: path, expected: recorded, actual: actual) }
        return true
    }

    /// Restores an archive into `store`, under the store lock. The archive is extracted into a fresh
    /// temporary folder inside the store with libarchive's secure flags, every entry checked before
    /// it is written (`ArchiveLimits`; only regular files and folders under `dafnet-archive/`, no
    /// links, `..` or absolute paths). Then every hash is verified (index, manifests, blobs, frames,
    /// each version's `state_sha256`, evaluation and model files) and only then is anything imported.
    ///
    /// Import: if the store has no version, the versions keep their numbers and HEAD moves to the
    /// archived version. Otherwise they are added as new versions (numbered after every number the
    /// store has used, parents mapped, `origin` recording the archive's number) and HEAD stays:
    /// `rollback --to` makes the restored version current. Base-model files go to
    /// `modelDestination` (default `<store>/models/<model name>`); an existing different file there
    /// is a conflict. Recorded in history.jsonl as `import`.
    @discardableResult
    public static func restore(from url: URL, into store: CheckpointStore, limits: ArchiveLimits = ArchiveLimits(),
                               modelDestination: URL? = nil) throws -> ArchiveRestoreReport {
        let archivePath = url.standardizedFileURL.path
        guard FileUtil.isRegularFile(archivePath) else { throw StoreError.io(FileIOError("open", archivePath, code: ENOENT)) }
        let checked = try checkChecksum(archivePath)
        return try store.withLock {
            let staging = store.rootPath + "/" + CheckpointStore.tempPrefix + "restore-" + FileUtil.randomSuffix()
            guard mkdir(staging, 0o700) == 0 else { throw StoreError.io(FileIOError("mkdir", staging)) }
            defer { try? FileUtil.removeTree(staging) }
            let files = try SafeExtractor.extract(archivePath, into: staging, root: rootFolder, limits: limits)
            let base = staging + "/" + rootFolder
            let staged = try validate(base: base, files: Set(files.map { String($0.dropFirst(rootFolder.count + 1)) }))
            var report = try importStaged(staged, base: base, archiveName: url.lastPathComponent, store: store,
                                          modelDestination: modelDestination)
            report.checksumVerified = checked
            return report
        }
    }

    /// Reads `archive.json` of an archive without extracting anything.
    public static func index(of url: URL) throws -> ArchiveIndex {
        let data = try SafeExtractor.readEntry(url.standardizedFileURL.path, named: rootFolder + "/archive.json", limit: 1 << 26)
        do {
            return try JSONDecoder().decode(ArchiveIndex.self, from: data)
        } catch {
            throw ArchiveError.invalidArchive("archive.json: \(Manifest.decodingSummary(error))")
        }
    }

    struct Staged {
        var index: ArchiveIndex
        var manifests: [Int: Manifest]
        var manifestData: [Int: Data]
    }

    /// Checks the extracted tree against its index; nothing is imported before this passes.
    static func validate(base: String, files: Set<String>) throws -> Staged {
        guard files.contains("archive.json") else { throw ArchiveError.invalidArchive("no archive.json") }
        let index: ArchiveIndex
        do {
            index = try JSONDecoder().decode(ArchiveIndex.self, from: storeIO { try FileUtil.read(base + "/archive.json", limit: 1 << 26) })
        } catch {
            throw ArchiveError.invalidArchive("archive.json: \(Manifest.decodingSummary(error))")
        }
        guard index.format == ArchiveIndex.currentFormat else { throw ArchiveError.invalidArchive("unknown format '\(index.format)'") }
        guard !index.versions.isEmpty, index.versions == index.versions.sorted(), Set(index.versions).count == index.versions.count,
              index.versions.contains(index.version), index.versions.allSatisfy({ $0 >= 1 }) else {
            throw ArchiveError.invalidArchive("bad version list")
        }
        var expected: Set<String> = ["archive.json"]
        for v in index.versions { expected.insert(Manifest.fileName(v)) }
        for o in index.objects {
            guard Hex.isSHA256(o) else { throw ArchiveError.invalidArchive("object name '\(o)' is not a sha256") }
            expected.insert("objects/" + o)
        }
        for (prefix, records) in [("evaluations/", index.evaluations), ("model/", index.model)] {
          for r in records {
            guard r.path.hasPrefix(prefix), Hex.isSHA256(r.sha256),
                  (try? SafeExtractor.checkPath(rootFolder + "/" + r.path, root: rootFolder, limits: ArchiveLimits())) != nil else {
                throw ArchiveError.invalidArchive("bad file record '\(r.path)'")
            }
            expected.insert(r.path)
          }
        }
        if let name = index.modelName, name.isEmpty || name.contains("/") || name == "." || name == ".." {
            throw ArchiveError.invalidArchive("bad model name '\(name)'")
        }
        if let extra = files.subtracting(expected).sorted().first { throw ArchiveError.invalidArchive("unexpected file '\(extra)'") }
        if let missing = expected.subtracting(files).sorted().first { throw ArchiveError.invalidArchive("missing file '\(missing)'") }

        // Blobs: hash and frame.
        var contentSize: [String: Int] = [:]
        for o in index.objects {
            let path = base + "/objects/" + o
            let bytes = try storeIO { try FileBytes.read(path) }
            let actual = Hex.sha256(bytes.buffer)
            guard actual == o else { throw ArchiveError.hashMismatch(path: "objects/" + o, expected: o, actual: actual) }
            do {
                contentSize[o] = try BlobCodec.decode(bytes.buffer, limit: Int(min(Int64(Int.max), ArchiveLimits().maxEntryBytes))).count
            } catch {
                throw StoreError.corruptBlob(hash: o, reason: "\(error)")
            }
        }
        // Manifests: hash, structure, blobs, state.
        var manifests: [Int: Manifest] = [:]
        var manifestData: [Int: Data] = [:]
        for v in index.versions {
            let rel = Manifest.fileName(v)
            let data = try storeIO { try FileUtil.read(base + "/" + rel, limit: 1 << 28) }
            let actual = Hex.sha256(data)
            guard let recorded = index.manifests[String(v)] else { throw ArchiveError.invalidArchive("no hash for \(rel)") }
            guard actual == recorded else { throw ArchiveError.hashMismatch(path: rel, expected: recorded, actual: actual) }
            let m = try Manifest.decode(data, path: rel, expectedVersion: v)
            if let p = m.parent, let recorded = m.parentManifestSHA256, let parentSHA = index.manifests[String(p)], parentSHA != recorded {
                throw ArchiveError.hashMismatch(path: Manifest.fileName(p) + " (recorded by its child " + rel + ")", expected: recorded, actual: parentSHA)
            }
            var state = StateHasher()
            for t in m.tensors {
                guard t.parts.allSatisfy({ contentSize[$0.blob] == $0.bytes }) else {
                    throw ArchiveError.invalidArchive("\(rel): blob of '\(t.name)' missing or of the wrong size")
                }
                let stored = try t.readParts { part in try storeIO { try FileBytes.read(base + "/objects/" + part.blob) } }
                let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: t.bytes, alignment: 64)
                defer { raw.deallocate() }
                try t.decode(stored, into: raw.baseAddress!)
                state.add(name: t.name, shape: t.shape, values: UnsafeRawBufferPointer(raw))
            }
            let stateHash = state.finalize()
            guard stateHash == m.stateSHA256 else { throw StoreError.stateMismatch(version: v, expected: m.stateSHA256, actual: stateHash) }
            for f in m.files where contentSize[f.blob] != f.bytes {
                throw ArchiveError.invalidArchive("\(rel): blob of file '\(f.name)' missing or of the wrong size")
            }
            manifests[v] = m
            manifestData[v] = data
        }
        // Evaluation and model files.
        for r in index.evaluations + index.model {
            let actual = try FileHash.sha256(ofFileAt: URL(fileURLWithPath: base + "/" + r.path))
            guard actual == r.sha256 else { throw ArchiveError.hashMismatch(path: r.path, expected: r.sha256, actual: actual) }
        }
        return Staged(index: index, manifests: manifests, manifestData: manifestData)
    }

    /// Copies a staged file into place through the store's file-system steps.
    private static func installCopy(of source: String, to path: String, in dir: String, store: CheckpointStore) throws {
        let bytes = try storeIO { try FileBytes.read(source) }
        var temps: [String] = []
        do {
            try store.install(bytes.buffer, at: path, in: dir, temps: &temps)
        } catch {
            for t in temps { try? store.fileSystem.removeFile(atPath: t) }
            throw error
        }
    }

    static func importStaged(_ staged: Staged, base: String, archiveName: String, store: CheckpointStore,
                             modelDestination: URL?) throws -> ArchiveRestoreReport {
        let index = staged.index
        let headBefore = try store.head()
        let existing = try store.versions()
        let keepNumbers = existing.isEmpty && headBefore == nil
        var map: [Int: Int] = [:]
        if keepNumbers {
            for v in index.versions { map[v] = v }
        } else {
            var next = try store.nextVersionNumber()
            for v in index.versions {
                map[v] = next
                next += 1
            }
        }
        // Base-model files: decide the destination and check conflicts before writing anything.
        var modelDir: String?
        if !index.model.isEmpty {
            let dest = modelDestination?.standardizedFileURL.path
                ?? store.rootPath + "/models/" + (index.modelName ?? "base-model")
            modelDir = dest
            for r in index.model {
                let target = dest + "/" + r.path.dropFirst("model/".count)
                if FileUtil.exists(target) {
                    let actual = try FileHash.sha256(ofFileAt: URL(fileURLWithPath: target))
                    guard actual == r.sha256 else {
                        throw ArchiveError.conflict(path: target, reason: "exists with other contents; choose another model destination")
                    }
                }
            }
        }
        return try storeIO {
            var added = 0
            var temps: [String] = []
            for o in index.objects {
                let bytes = try FileBytes.read(base + "/objects/" + o)
                var created: [String] = []
                if try store.storeBlob(bytes.buffer, hash: o, temps: &temps, created: &created) { added += 1 }
            }
            if added > 0 { try store.fileSystem.syncDirectory(atPath: store.objectsPath) }
            var newSHA: [Int: String] = [:]  // archive version → the hash of its manifest as installed
            for v in index.versions {
                let target = store.manifestPath(map[v]!)
                if keepNumbers {
                    try installCopy(of: base + "/" + Manifest.fileName(v), to: target, in: store.versionsPath, store: store)
                } else {
                    var m = staged.manifests[v]!
                    m.version = map[v]!
                    // The chain of hashes is rebuilt over the renumbered manifests (ascending: parents first).
                    m.parentManifestSHA256 = m.parent.flatMap { newSHA[$0] }
                    m.parent = m.parent.flatMap { map[$0] }
                    if m.parent == nil { m.parentManifestSHA256 = nil }
                    m.origin = m.origin ?? ManifestOrigin(archive: archiveName, version: v)
                    let data = try m.encoded()
                    newSHA[v] = Hex.sha256(data)
                    try data.withUnsafeBytes { try store.install($0, at: target, in: store.versionsPath, temps: &temps) }
                }
            }
            try store.fileSystem.syncDirectory(atPath: store.versionsPath)
            for r in index.evaluations {
                // evaluations/vNNNNNNNN/rest → the new number's folder.
                let parts = r.path.split(separator: "/", maxSplits: 2).map(String.init)
                guard parts.count == 3, parts[1].hasPrefix("v"), let v = Int(parts[1].dropFirst()), let nv = map[v] else { continue }
                let target = store.evaluationsDirectory(for: nv).path + "/" + parts[2]
                let dir = (target as NSString).deletingLastPathComponent
                try FileUtil.makeDirectories(dir)
                try installCopy(of: base + "/" + r.path, to: target, in: dir, store: store)
                try store.fileSystem.syncDirectory(atPath: dir)
            }
            if let modelDir {
                for r in index.model {
                    let target = modelDir + "/" + r.path.dropFirst("model/".count)
                    if FileUtil.exists(target) { continue }
                    let dir = (target as NSString).deletingLastPathComponent
                    try FileUtil.makeDirectories(dir)
                    try installCopy(of: base + "/" + r.path, to: target, in: dir, store: store)
                    try store.fileSystem.syncDirectory(atPath: dir)
                }
            }
            let restored = map[index.version]!
            var headAfter = headBefore
            if keepNumbers {
                try store.writeHead(restored, temps: &temps)
                try store.fileSystem.syncDirectory(atPath: store.rootPath)
                headAfter = restored
            }
            try store.appendHistory(HistoryRecord(op: .`import`, version: headAfter, from: headBefore, source: archiveName,
                                                  versions: index.versions.map { map[$0]! }))
            return ArchiveRestoreReport(versionMap: map, restoredVersion: restored, headMoved: keepNumbers, checksumVerified: false,
                                        blobsAdded: added, modelDirectory: modelDir)
        }
    }
}
