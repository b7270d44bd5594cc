import Foundation
import Storage
import TensorCore
import XCTest

final class ArchiveTests: XCTestCase {
    private func state(_ seed: UInt64) -> [String: Tensor] {
        ["h.1.mlp.c_fc.dw": randomTensor([8, 16], seed: seed), "h.1.mlp.c_fc.db": randomTensor([16], seed: seed + 50)]
    }

    private func store(_ root: URL, create: Bool = true) throws -> CheckpointStore {
        try CheckpointStore(at: root, create: create, fileSystem: NoSyncFileSystem())
    }

    /// A store with versions 1 → 2 → 3, rolled back to 2, then 4 (parent 2); evaluation files for
    /// 1 and 4.
    private func sourceStore(_ dir: URL) throws -> CheckpointStore {
        let s = try store(dir.appendingPathComponent("source"))
        for seed in 1...3 {
            try s.commit(CommitRequest(tensors: state(UInt64(seed)), files: ["edit_log.jsonl": Data("edit \(seed)\n".utf8)],
                                       batch: BatchReference(name: "b\(seed).jsonl", sha256: String(repeating: "\(seed)", count: 64))))
        }
        try s.rollback(to: .number(2))
        try s.commit(CommitRequest(tensors: state(4), info: .object(["reliability": .double(1)])))
        for v in [1, 4] {
            let eval = s.evaluationsDirectory(for: v)
            try FileManager.default.createDirectory(at: eval.appendingPathComponent("details"), withIntermediateDirectories: true)
            try Data("{\"version\":\(v)}".utf8).write(to: eval.appendingPathComponent("evaluation.json"))
            try Data("per-edit \(v)".utf8).write(to: eval.appendingPathComponent("details/edits.jsonl"))
        }
        return s
    }

    func testCreateAndRestoreIntoAnEmptyStore() throws {
        let dir = try makeTemporaryDirectory(self)
        let source = try sourceStore(dir)
        let model = dir.appendingPathComponent("gpt2-tiny")
        try FileManager.default.createDirectory(at: model, withIntermediateDirectories: true)
        try Data("{\"model_type\":\"gpt2\"}".utf8).write(to: model.appendingPathComponent("config.json"))
        try Data(repeating: 3, count: 5000).write(to: model.appendingPathComponent("model.safetensors"))
        let archive = dir.appendingPathComponent("v4.tar.zst")

        let created = try CheckpointArchive.create(store: source, version: .head, to: archive, includeModel: model)
        XCTAssertEqual(created.versions, [1, 2, 4])
        XCTAssertEqual(created.evaluationFiles, 4)
        XCTAssertEqual(created.modelFiles, 2)
        // A zstd stream.
        XCTAssertEqual(Array(try Data(contentsOf: archive).prefix(4)), [0x28, 0xB5, 0x2F, 0xFD])

        let target = try store(dir.appendingPathComponent("target"))
        let report = try CheckpointArchive.restore(from: archive, into: target)
        XCTAssertTrue(report.headMoved)
        XCTAssertEqual(report.versionMap, [1: 1, 2: 2, 4: 4])
        XCTAssertEqual(try target.head(), 4)
        XCTAssertEqual(try target.versions(), [1, 2, 4])
        for v in [1, 2, 4] {
            XCTAssertEqual(try target.manifestData(v), try source.manifestData(v), "manifest \(v) byte-identical")
            assertStatesEqual(try target.loadTensors(.number(v)), try source.loadTensors(.number(v)))
        }
        XCTAssertEqual(try target.fileData("edit_log.jsonl", in: .number(2)), Data("edit 2\n".utf8))
        XCTAssertEqual(try Data(contentsOf: target.evaluationsDirectory(for: 4).appendingPathComponent("details/edits.jsonl")),
                       Data("per-edit 4".utf8))
        let restoredModel = try XCTUnwrap(report.modelDirectory)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: restoredModel + "/model.safetensors")), Data(repeating: 3, count: 5000))
        XCTAssertTrue(restoredModel.hasSuffix("models/gpt2-tiny"))
        XCTAssertEqual(try target.history().last?.op, .import)
        let verify = try target.verify()
        XCTAssertTrue(verify.isClean, "\(verify.problems)")
        XCTAssertEqual(verify.warnings, [])
        XCTAssertEqual(try target.resolve(.headMinus(1)), 2)
    }

    /// Versions whose tensors share parts (rows added per version) archive and restore whole, into an
    /// empty store and into one that already has versions.
    func testVersionsWithSharedPartsRoundTrip() throws {
        let dir = try makeTemporaryDirectory(self)
        let source = try store(dir.appendingPathComponent("source"))
        var reps = randomTensor([2, 8], seed: 1)
        for v in 1...3 {
            reps = reps.appendingRows(randomTensor([v, 8], seed: UInt64(10 + v))).copy()
            try source.commit(CommitRequest(tensors: ["reps": reps, "dw": randomTensor([4, 4], seed: UInt64(v))]))
        }
        XCTAssertEqual(try source.manifest(3).tensors.first { $0.name == "reps" }!.parts.count, 3)
        let archive = dir.appendingPathComponent("v3.tar.zst")
        _ = try CheckpointArchive.create(store: source, version: .head, to: archive)
        let empty = try store(dir.appendingPathComponent("empty"))
        _ = try CheckpointArchive.restore(from: archive, into: empty)
        let busy = try store(dir.appendingPathComponent("busy"))
        try busy.commit(CommitRequest(tensors: state(7)))
        let report = try CheckpointArchive.restore(from: archive, into: busy)
        for (target, map) in [(empty, [1: 1, 2: 2, 3: 3]), (busy, report.versionMap)] {
            for v in 1...3 { assertStatesEqual(try target.loadTensors(.number(map[v]!)), try source.loadTensors(.number(v))) }
            XCTAssertTrue(try target.verify().isClean)
        }
    }

    func testRestoreIntoAStoreWithVersionsAddsThemWithoutMovingHead() throws {
        let dir = try makeTemporaryDirectory(self)
        let source = try sourceStore(dir)
        let archive = dir.appendingPathComponent("v4.tar.zst")
        try CheckpointArchive.create(store: source, version: .number(4), to: archive)

        let target = try store(dir.appendingPathComponent("busy"))
        try target.commit(CommitRequest(tensors: state(100)))
        try target.commit(CommitRequest(tensors: state(101)))
        let report = try CheckpointArchive.restore(from: archive, into: target)
        XCTAssertFalse(report.headMoved)
        XCTAssertEqual(report.versionMap, [1: 3, 2: 4, 4: 5])
        XCTAssertEqual(report.restoredVersion, 5)
        XCTAssertEqual(try target.head(), 2)
        let m5 = try target.manifest(5)
        XCTAssertEqual(m5.parent, 4)
        XCTAssertEqual(m5.origin, ManifestOrigin(archive: "v4.tar.zst", version: 4))
        XCTAssertEqual(m5.stateSHA256, try source.manifest(4).stateSHA256)
        XCTAssertNil(try target.manifest(3).parent)
        try target.rollback(to: .number(5))
        assertStatesEqual(try target.loadTensors(), state(4))
        XCTAssertTrue(FileManager.default.fileExists(atPath: target.evaluationsDirectory(for: 5).appendingPathComponent("evaluation.json").path))
        XCTAssertTrue(try target.verify().isClean)
        // Restoring the same archive again adds another copy.
        let again = try CheckpointArchive.restore(from: archive, into: target)
        XCTAssertEqual(again.versionMap, [1: 6, 2: 7, 4: 8])
    }

    // MARK: Hostile archives

    /// Asserts that restoring `archive` fails and leaves the store exactly as it was.
    private func assertRefused(_ archive: URL, limits: ArchiveLimits = ArchiveLimits(), dir: URL,
                               file: StaticString = #filePath, line: UInt = #line) throws -> Error? {
        let target = try store(dir.appendingPathComponent("target-" + UUID().uuidString))
        try target.commit(CommitRequest(tensors: state(7)))
        let before = try snapshot(target.root)
        let error = expectError({ try CheckpointArchive.restore(from: archive, into: target, limits: limits) }, file: file, line: line)
        XCTAssertEqual(try snapshot(target.root), before, "nothing imported, nothing left behind", file: file, line: line)
        XCTAssertEqual(try target.versions(), [1], file: file, line: line)
        return error
    }

    /// Every path and size under a folder.
    private func snapshot(_ root: URL) throws -> [String: Int] {
        var out: [String: Int] = [:]
        let e = FileManager.default.enumerator(atPath: root.path)!
        while let rel = e.nextObject() as? String {
            if rel == "lock" { continue }
            let attrs = try FileManager.default.attributesOfItem(atPath: root.path + "/" + rel)
            out[rel] = (attrs[.size] as? Int) ?? -1
        }
        return out
    }

    private func hostile(_ dir: URL, _ name: String, _ build: (TarArchiveWriter) throws -> Void) throws -> URL {
        let url = dir.appendingPathComponent(name)
        let w = try TarArchiveWriter(path: url.path, compression: .zstd(level: 3))
        try w.addFile("dafnet-archive/archive.json", data: Data("{}".utf8))
        try build(w)
        try w.finish()
        return url
    }

    func testRefusesDotDotPaths() throws {
        let dir = try makeTemporaryDirectory(self)
        for path in ["dafnet-archive/../../escaped", "dafnet-archive/objects/../../../escaped", "../escaped", "dafnet-archive/./x"] {
            let archive = try hostile(dir, "dotdot.tar.zst") { try $0.addFile(path, data: Data("pwned".utf8)) }
            let error = try assertRefused(archive, dir: dir)
            guard case ArchiveError.unsafeEntry(_, let reason)? = error as? ArchiveError else { return XCTFail("\(path): \(String(describing: error))") }
            XCTAssertTrue(reason.contains("..") || reason.contains("'.'") || reason.contains("outside"), reason)
            XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("escaped").path))
        }
    }

    func testRefusesAbsolutePaths() throws {
        let dir = try makeTemporaryDirectory(self)
        let outside = dir.appendingPathComponent("absolute-target").path
        let archive = try hostile(dir, "absolute.tar.zst") { try $0.addFile(outside, data: Data("pwned".utf8)) }
        let error = try assertRefused(archive, dir: dir)
        guard case ArchiveError.unsafeEntry(_, let reason)? = error as? ArchiveError else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue(reason.contains("absolute"), reason)
        XCTAssertFalse(FileManager.default.fileExists(atPath: outside))
    }

    func testRefusesSymlinkThenFileThroughIt() throws {
        let dir = try makeTemporaryDirectory(self)
        let outside = dir.appendingPathComponent("outside")
        try FileManager.default.createDirectory(at: outside, withIntermediateDirectories: true)
        let archive = try hostile(dir, "symlink.tar.zst") {
            try $0.addSymlink("dafnet-archive/objects", target: outside.path)
            try $0.addFile("dafnet-archive/objects/pwned", data: Data("pwned".utf8))
        }
        let error = try assertRefused(archive, dir: dir)
        guard case ArchiveError.unsafeEntry(_, let reason)? = error as? ArchiveError else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue(reason.contains("symbolic link"), reason)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: outside.path), [])
    }

    func testRefusesHardlinks() throws {
        let dir = try makeTemporaryDirectory(self)
        let secret = dir.appendingPathComponent("secret")
        try Data("secret".utf8).write(to: secret)
        let archive = try hostile(dir, "hardlink.tar.zst") {
            try $0.addHardlink("dafnet-archive/objects/\(String(repeating: "a", count: 64))", target: secret.path)
        }
        let error = try assertRefused(archive, dir: dir)
        guard case ArchiveError.unsafeEntry(_, let reason)? = error as? ArchiveError else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue(reason.contains("hard link"), reason)
        // A hard link to another entry of the archive is refused as well.
        let inner = try hostile(dir, "hardlink2.tar.zst") {
            try $0.addHardlink("dafnet-archive/versions/00000001.json", target: "dafnet-archive/archive.json")
        }
        XCTAssertNotNil(try assertRefused(inner, dir: dir) as? ArchiveError)
    }

    func testRefusesOtherEntryKinds() throws {
        let dir = try makeTemporaryDirectory(self)
        let repeated = try hostile(dir, "repeat.tar.zst") { try $0.addFile("dafnet-archive/archive.json", data: Data("{}".utf8)) }
        guard case ArchiveError.unsafeEntry(_, let reason)? = try assertRefused(repeated, dir: dir) as? ArchiveError else { return XCTFail() }
        XCTAssertTrue(reason.contains("repeated"))
        let outsideRoot = try hostile(dir, "other-root.tar.zst") { try $0.addFile("somewhere/else", data: Data()) }
        XCTAssertNotNil(try assertRefused(outsideRoot, dir: dir) as? ArchiveError)
        let garbage = dir.appendingPathComponent("garbage.tar.zst")
        try Data(repeating: 0x42, count: 3000).write(to: garbage)
        XCTAssertNotNil(try assertRefused(garbage, dir: dir) as? ArchiveError)
    }

    func testRefusesABombDeclaringAHugeSize() throws {
        let dir = try makeTemporaryDirectory(self)
        // The header declares 1 TiB; the writer runs out of its 256 KiB buffer padding the data,
        // which leaves a valid header followed by a little data.
        let writer = try TarArchiveWriter(memoryCapacity: 256 << 10, compression: .none)
        try writer.addFile("dafnet-archive/archive.json", data: Data("{}".utf8))
        XCTAssertThrowsError(try writer.addFile("dafnet-archive/objects/bomb", data: Data(repeating: 0, count: 1000), declaredSize: 1 << 40))
        let archive = dir.appendingPathComponent("bomb.tar")
        try writer.writtenData.write(to: archive)
        let error = try assertRefused(archive, dir: dir)
        guard case ArchiveError.tooLarge(let path, let reason)? = error as? ArchiveError else { return XCTFail("\(String(describing: error))") }
        XCTAssertEqual(path, "dafnet-archive/objects/bomb")
        XCTAssertTrue(reason.contains("1099511627776"), reason)
    }

    func testRefusesArchivesOverTheTotalSizeLimit() throws {
        let dir = try makeTemporaryDirectory(self)
        let archive = try hostile(dir, "total.tar.zst") {
            for i in 0..<4 { try $0.addFile("dafnet-archive/evaluations/v00000001/\(i)", data: Data(repeating: 1, count: 40_000)) }
        }
        let limits = ArchiveLimits(maxTotalBytes: 100_000, maxEntryBytes: 50_000)
        guard case ArchiveError.tooLarge? = try assertRefused(archive, limits: limits, dir: dir) as? ArchiveError else { return XCTFail() }
        let entryLimits = ArchiveLimits(maxTotalBytes: 1_000_000, maxEntryBytes: 10_000)
        guard case ArchiveError.tooLarge? = try assertRefused(archive, limits: entryLimits, dir: dir) as? ArchiveError else { return XCTFail() }
        let countLimits = ArchiveLimits(maxEntries: 3)
        guard case ArchiveError.tooLarge? = try assertRefused(archive, limits: countLimits, dir: dir) as? ArchiveError else { return XCTFail() }
    }

    func testRefusesTamperedContent() throws {
        let dir = try makeTemporaryDirectory(self)
        let source = try sourceStore(dir)
        // Rebuild the archive by hand with one blob's bytes flipped.
        let m = try source.manifest(4)
        let badBlob = m.tensors[0].parts[0].blob
        let good = dir.appendingPathComponent("good.tar.zst")
        try CheckpointArchive.create(store: source, version: .number(4), to: good)
        let staging = dir.appendingPathComponent("unpacked")
        try FileManager.default.createDirectory(at: staging, withIntermediateDirectories: true)
        let unpack = try store(staging.appendingPathComponent("s"))
        try CheckpointArchive.restore(from: good, into: unpack)
        func repack(_ name: String, tamper: (String, inout Data) -> Void) throws -> URL {
            let url = dir.appendingPathComponent(name)
            let w = try TarArchiveWriter(path: url.path, compression: .zstd(level: 1))
            var files: [(String, Data)] = []
            let index = try CheckpointArchive.index(of: good)
            files.append(("archive.json", try JSONEncoder().encode(index)))
            for v in index.versions { files.append(("versions/" + String(format: "%08d.json", v), try unpack.manifestData(v))) }
            for o in index.objects { files.append(("objects/" + o, try Data(contentsOf: unpack.root.appendingPathComponent("objects/" + o)))) }
            for r in index.evaluations {
                let parts = r.path.split(separator: "/", maxSplits: 2)
                files.append((r.path, try Data(contentsOf: unpack.root.appendingPathComponent("evaluations/\(parts[1])/\(parts[2])"))))
            }
            for (path, data) in files {
                var d = data
                tamper(path, &d)
                try w.addFile("dafnet-archive/" + path, data: d)
            }
            try w.finish()
            return url
        }
        let flipped = try repack("flipped.tar.zst") { path, data in if path == "objects/" + badBlob { data[data.count / 2] ^= 1 } }
        guard case ArchiveError.hashMismatch(let path, _, _)? = try assertRefused(flipped, dir: dir) as? ArchiveError else { return XCTFail() }
        XCTAssertEqual(path, "objects/" + badBlob)
        let manifest = try repack("manifest.tar.zst") { path, data in
            if path == "versions/00000004.json" { data = Data(String(decoding: data, as: UTF8.self).replacingOccurrences(of: "\"reliability\"", with: "\"reliabilitY\"").utf8) }
        }
        guard case ArchiveError.hashMismatch? = try assertRefused(manifest, dir: dir) as? ArchiveError else { return XCTFail() }
        let evaluation = try repack("evaluation.tar.zst") { path, data in if path.hasSuffix("evaluation.json") { data.append(0x20) } }
        guard case ArchiveError.hashMismatch? = try assertRefused(evaluation, dir: dir) as? ArchiveError else { return XCTFail() }

        // archive.json itself, with a manifest edited and its recorded hash updated to match: consistent
        // inside, so only the archive's .sha256 beside it (written by create) catches it.
        XCTAssertTrue(FileManager.default.fileExists(atPath: good.path + CheckpointArchive.checksumSuffix))
        let forged = try repack("forged.tar.zst") { path, data in
            if path == "archive.json" {
                var index = try! JSONDecoder().decode(ArchiveIndex.self, from: data)
                index.created = "2020-01-01T00:00:00Z"
                data = try! JSONEncoder().encode(index)
            }
        }
        try FileManager.default.copyItem(atPath: good.path + CheckpointArchive.checksumSuffix, toPath: forged.path + CheckpointArchive.checksumSuffix)
        guard case ArchiveError.hashMismatch(let p, _, _)? = try assertRefused(forged, dir: dir) as? ArchiveError else { return XCTFail() }
        XCTAssertEqual(p, forged.standardizedFileURL.path)
        let ok = try CheckpointArchive.restore(from: good, into: try store(dir.appendingPathComponent("fresh")))
        XCTAssertTrue(ok.checksumVerified)
    }

}
