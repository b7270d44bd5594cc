import Foundation
import Storage
import TensorCore
import XCTest

final class CheckpointStoreTests: XCTestCase {
    let sha = String(repeating: "0123456789abcdef", count: 4)

    private func state(_ seed: UInt64) -> [String: Tensor] {
        [
            "transformer.h.2.mlp.c_fc.delta_weight": randomTensor([8, 32], seed: seed),
            "transformer.h.2.mlp.c_fc.delta_bias": randomTensor([32], seed: seed + 100),
            "aux.past_reps": randomTensor([3, 8], seed: seed + 200),
        ]
    }

    /// A new store; `durable: false` skips fsync (see `NoSyncFileSystem`) to keep the suite fast.
    private func newStore(_ config: StoreConfiguration = StoreConfiguration(), durable: Bool = false) throws -> (CheckpointStore, URL) {
        let root = try makeTemporaryDirectory(self).appendingPathComponent("checkpoints")
        let fs: any StoreFileSystem = durable ? POSIXFileSystem() : NoSyncFileSystem()
        return (try CheckpointStore(at: root, create: true, configuration: config, fileSystem: fs), root)
    }

    func testCommitAndLoadRoundTrip() throws {
        let (store, root) = try newStore(durable: true)
        XCTAssertNil(try store.head())
        guard case StoreError.empty? = expectError({ try store.load() }) as? StoreError else { return XCTFail("empty store") }
        let s1 = state(1)
        let info: JSONValue = .object(["reliability": .double(0.75), "edits": .int(4)])
        let m1 = try store.commit(CommitRequest(tensors: s1, files: ["edit_log.jsonl": Data("{\"a\":1}\n".utf8)],
                                                baseModelSHA256: sha, editorSHA256: sha,
                                                batch: BatchReference(name: "batch-001.jsonl", sha256: sha), info: info))
        XCTAssertEqual(m1.version, 1)
        XCTAssertNil(m1.parent)
        XCTAssertEqual(try store.head(), 1)
        XCTAssertEqual(m1.tensors.map(\.name), ["aux.past_reps", "transformer.h.2.mlp.c_fc.delta_bias", "transformer.h.2.mlp.c_fc.delta_weight"])

        // A fresh open reads the same thing back.
        let reopened = try CheckpointStore(at: root)
        let loaded = try reopened.load()
        assertStatesEqual(loaded.tensors, s1)
        XCTAssertEqual(loaded.manifest, m1)
        XCTAssertEqual(loaded.manifest.info, info)
        XCTAssertEqual(loaded.manifest.batch?.name, "batch-001.jsonl")
        XCTAssertEqual(try reopened.fileData("edit_log.jsonl"), Data("{\"a\":1}\n".utf8))
        assertBitwiseEqual(try reopened.tensor("aux.past_reps"), s1["aux.past_reps"]!)
        XCTAssertThrowsError(try reopened.tensor("missing"))
        let source = try reopened.source(.head)
        XCTAssertEqual(source.tensorNames.count, 3)
        assertBitwiseEqual(try source.tensor("aux.past_reps"), s1["aux.past_reps"]!)

        // The manifest on disk is JSON with the documented keys.
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: root.appendingPathComponent("versions/00000001.json"))) as! [String: Any]
        for key in ["version", "parent", "base_model_sha256", "editor_sha256", "batch", "created", "tensors", "state_sha256", "info"] {
            XCTAssertNotNil(json[key], key)
        }
        let manifestSHA = try FileHash.sha256(ofFileAt: root.appendingPathComponent("versions/00000001.json"))
        XCTAssertEqual(try String(contentsOf: root.appendingPathComponent("HEAD"), encoding: .utf8), "1 \(manifestSHA)\n",
                       "HEAD records the version and its manifest's hash")
    }

    func testStateHashIsCanonicalAcrossStoresAndSettings() throws {
        let s = state(7)
        let (a, _) = try newStore(StoreConfiguration(compressionLevel: 1, shuffle: false))
        let (b, _) = try newStore(StoreConfiguration(compressionLevel: 9, shuffle: true))
        let ma = try a.commit(CommitRequest(tensors: s))
        let mb = try b.commit(CommitRequest(tensors: s, info: .string("different info")))
        XCTAssertEqual(ma.stateSHA256, mb.stateSHA256)
        XCTAssertNotEqual(ma.tensors[0].parts[0].blob, mb.tensors[0].parts[0].blob)
        let changed = state(7)
        changed["aux.past_reps"]![0] += 1e-7
        XCTAssertNotEqual(try a.commit(CommitRequest(tensors: changed)).stateSHA256, ma.stateSHA256)
        // Same values, another shape: another state.
        var reshaped = state(7)
        reshaped["aux.past_reps"] = s["aux.past_reps"]!.reshaped([8, 3])
        XCTAssertNotEqual(try a.commit(CommitRequest(tensors: reshaped)).stateSHA256, ma.stateSHA256)
        // An empty state hashes too.
        XCTAssertTrue(try a.commit(CommitRequest(tensors: [:])).stateSHA256.count == 64)
    }

    func testVersionsDeduplicateBlobs() throws {
        let (store, root) = try newStore()
        let s1 = state(1)
        var s2 = s1
        s2["aux.past_reps"] = randomTensor([4, 8], seed: 99)
        try store.commit(CommitRequest(tensors: s1))
        let m2 = try store.commit(CommitRequest(tensors: s2))
        XCTAssertEqual(m2.parent, 1)
        let objects = try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("objects").path)
        XCTAssertEqual(objects.count, 4)
        let m3 = try store.commit(CommitRequest(tensors: s2))
        XCTAssertEqual(m3.stateSHA256, m2.stateSHA256)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("objects").path).count, 4)
    }

    /// A tensor that only grew by rows since the parent (the editor's per-edit rows) stores the new rows
    /// alone and keeps the parent's parts; anything else is stored whole.
    func testGrowingTensorsStoreOnlyTheirNewRows() throws {
        let (store, root) = try newStore()
        func grown(_ t: Tensor, by rows: Int, seed: UInt64) -> Tensor { t.appendingRows(randomTensor([rows, 8], seed: seed)).copy() }
        var s = state(1)
        let m1 = try store.commit(CommitRequest(tensors: s))
        XCTAssertEqual(m1.format, Manifest.singleBlobFormat)
        var grownStates = [s]
        for (v, rows) in [(2, 2), (3, 4)] {
            s["aux.past_reps"] = grown(s["aux.past_reps"]!, by: rows, seed: UInt64(300 + v))
            s["transformer.h.2.mlp.c_fc.delta_weight"] = randomTensor([8, 32], seed: UInt64(400 + v))
            let m = try store.commit(CommitRequest(tensors: s))
            grownStates.append(s)
            XCTAssertEqual(m.format, Manifest.partsFormat)
            let reps = m.tensors.first { $0.name == "aux.past_reps" }!
            XCTAssertEqual(reps.parts.count, v, "one part per version")
            XCTAssertEqual(Array(reps.parts.dropLast()), try store.manifest(v - 1).tensors.first { $0.name == "aux.past_reps" }!.parts)
            XCTAssertEqual(reps.parts.last!.bytes, rows * 8 * 4, "the new rows alone")
            XCTAssertEqual(m.tensors.first { $0.name.hasSuffix("delta_weight") }!.parts.count, 1, "a changed tensor is stored whole")
        }
        for v in 1...3 { assertStatesEqual(try CheckpointStore(at: root).loadTensors(.number(v)), grownStates[v - 1]) }
        // `checkpoints list`: what each version added; the shared rows count once.
        let rows = try store.summaries()
        XCTAssertEqual(rows[0].newBytes, rows[0].storedBytes)
        let repsParts = try store.manifest(3).tensors.first { $0.name == "aux.past_reps" }!.parts
        XCTAssertEqual(rows[2].storedBytes! - rows[2].newBytes!, repsParts.dropLast().reduce(0) { $0 + $1.storedBytes }
                       + (try store.manifest(3).tensors.first { $0.name.hasSuffix("delta_bias") }!.storedBytes),
                       "the parent's reps parts and the unchanged bias are not new")
        XCTAssertTrue(try store.verify().isClean)

        // A changed earlier row is not a prefix: stored whole.
        var changed = s
        let reps = s["aux.past_reps"]!.copy()
        reps.data[0] += 1
        changed["aux.past_reps"] = grown(reps, by: 1, seed: 9)
        XCTAssertEqual(try store.commit(CommitRequest(tensors: changed)).tensors.first { $0.name == "aux.past_reps" }!.parts.count, 1)
        // Growing from an older version after a rollback keeps that version's parts.
        try store.rollback(to: .number(2))
        var fromTwo = grownStates[1]
        fromTwo["aux.past_reps"] = grown(fromTwo["aux.past_reps"]!, by: 3, seed: 77)
        let m5 = try store.commit(CommitRequest(tensors: fromTwo))
        XCTAssertEqual(Array(m5.tensors.first { $0.name == "aux.past_reps" }!.parts.prefix(2)),
                       try store.manifest(2).tensors.first { $0.name == "aux.past_reps" }!.parts)
        assertStatesEqual(try store.loadTensors(), fromTwo)

        // gc of the versions that first wrote the shared parts keeps the parts the others use.
        try store.rollback(to: .number(3))
        _ = try store.gc(keep: 0)
        XCTAssertEqual(try store.versions(), [3])
        assertStatesEqual(try store.loadTensors(), grownStates[2])
        XCTAssertTrue(try store.verify().isClean)

        // A damaged shared part is caught when the version that reuses it loads.
        let first = try store.manifest(3).tensors.first { $0.name == "aux.past_reps" }!.parts[0].blob
        try flipByte(in: root.appendingPathComponent("objects/\(first)"), at: 12)
        XCTAssertThrowsError(try CheckpointStore(at: root).loadTensors())
        XCTAssertFalse(try store.verify().isClean)
    }

    /// At `maxTensorParts` parts a grown tensor is stored whole again: loads read a bounded number of blobs.
    func testGrownTensorsAreStoredWholeAgainAtThePartLimit() throws {
        let (store, _) = try newStore(StoreConfiguration(maxTensorParts: 3))
        var reps = randomTensor([1, 8], seed: 1)
        var counts: [Int] = []
        for v in 1...7 {
            if v > 1 { reps = reps.appendingRows(randomTensor([1, 8], seed: UInt64(v))).copy() }
            let m = try store.commit(CommitRequest(tensors: ["reps": reps]))
            counts.append(m.tensors[0].parts.count)
            assertStatesEqual(try store.loadTensors(), ["reps": reps])
        }
        XCTAssertEqual(counts, [1, 2, 3, 1, 2, 3, 1])
    }

    func testRollbackAndRollForward() throws {
        let (store, root) = try newStore()
        for seed in 1...4 { try store.commit(CommitRequest(tensors: state(UInt64(seed)))) }
        XCTAssertEqual(try store.head(), 4)
        try store.rollback(steps: 2)
        XCTAssertEqual(try store.head(), 2)
        assertStatesEqual(try store.loadTensors(), state(2))
        XCTAssertEqual(try store.versions(), [1, 2, 3, 4], "later versions stay listed")
        try store.rollback(to: .number(4))
        XCTAssertEqual(try store.head(), 4)
        assertStatesEqual(try store.loadTensors(), state(4))
        try store.rollback(to: try VersionRef(parsing: "1"))
        XCTAssertEqual(try store.resolve(try VersionRef(parsing: "HEAD")), 1)
        guard case StoreError.notEnoughAncestors? = expectError({ try store.rollback(steps: 1) }) as? StoreError else {
            return XCTFail("version 1 has no parent")
        }
        XCTAssertThrowsError(try store.rollback(to: .number(9)))
        // A commit after a rollback: number max+1, parent the current HEAD.
        let m5 = try store.commit(CommitRequest(tensors: state(5)))
        XCTAssertEqual(m5.version, 5)
        XCTAssertEqual(m5.parent, 1)
        XCTAssertEqual(try store.resolve(.headMinus(1)), 1)
        // Every move is in the history.
        let ops = try store.history().map { "\($0.op.rawValue) \($0.from.map(String.init) ?? "-")→\($0.version.map(String.init) ?? "-")" }
        XCTAssertEqual(ops, ["commit -→1", "commit 1→2", "commit 2→3", "commit 3→4", "rollback 4→2", "rollback 2→4",
                             "rollback 4→1", "commit 1→5"])
        XCTAssertEqual(try CheckpointStore(at: root).head(), 5)
        for text in ["HEAD~2", "head", "3"] { XCTAssertNoThrow(try VersionRef(parsing: text)) }
        for text in ["", "0", "-1", "HEAD~x", "v3"] { XCTAssertThrowsError(try VersionRef(parsing: text), text) }
    }

    func testRollbackRefusesACorruptedVersion() throws {
        let (store, root) = try newStore()
        let m1 = try store.commit(CommitRequest(tensors: state(1)))
        try store.commit(CommitRequest(tensors: state(2)))
        try flipByte(in: root.appendingPathComponent("objects/\(m1.tensors[0].parts[0].blob)"), at: 20)
        guard case StoreError.hashMismatch? = expectError({ try store.rollback(to: .number(1)) }) as? StoreError else {
            return XCTFail("rollback onto a corrupted version")
        }
        XCTAssertEqual(try store.head(), 2)
    }

    func testLoadRefusesCorruption() throws {
        let (store, root) = try newStore()
        let m = try store.commit(CommitRequest(tensors: state(1)))
        let blob = root.appendingPathComponent("objects/\(m.tensors[2].parts[0].blob)")
        let original = try Data(contentsOf: blob)

        // Flipped byte: the blob no longer hashes to its name.
        try flipByte(in: blob, at: original.count / 2)
        let flipped = expectError { try store.load() }
        guard case StoreError.hashMismatch? = flipped as? StoreError else { return XCTFail("\(String(describing: flipped))") }
        XCTAssertTrue("\(flipped!)".contains(m.tensors[2].parts[0].blob))

        // A truncated frame, renamed to its own hash so only the frame check can catch it.
        let truncated = original.prefix(original.count - 3)
        let truncatedHash = truncated.withUnsafeBytes { SHA256Hex.of($0) }
        try truncated.write(to: root.appendingPathComponent("objects/\(truncatedHash)"))
        try original.write(to: blob)
        var manifestData = try String(contentsOf: root.appendingPathComponent("versions/00000001.json"), encoding: .utf8)
        manifestData = manifestData.replacingOccurrences(of: m.tensors[2].parts[0].blob, with: truncatedHash)
        try manifestData.write(to: root.appendingPathComponent("versions/00000001.json"), atomically: true, encoding: .utf8)
        // (Through HEAD the edited manifest no longer matches HEAD's record of its hash; by number
        // the blob checks are what is tested.)
        guard case StoreError.manifestChanged(1, "HEAD", _, _)? = expectError({ try store.load() }) as? StoreError else { return XCTFail("chain") }
        let frameError = expectError { try store.load(.number(1)) }
        guard case StoreError.corruptBlob(_, let reason)? = frameError as? StoreError, reason.contains("truncated") else {
            return XCTFail("\(String(describing: frameError))")
        }

        // A bad manifest.
        try Data("{\"format\":\"dafnet-checkpoint-manifest/1\",\"version\":1".utf8).write(to: root.appendingPathComponent("versions/00000001.json"))
        guard case StoreError.badManifest? = expectError({ try store.load(.number(1)) }) as? StoreError else { return XCTFail("bad manifest") }
        // A manifest that names another version.
        var m2 = m
        m2.version = 2
        try m2.encoded().write(to: root.appendingPathComponent("versions/00000001.json"))
        guard case StoreError.badManifest(_, let why)? = expectError({ try store.manifest(1) }) as? StoreError, why.contains("version 2") else {
            return XCTFail("version mismatch")
        }
        // A manifest whose values were edited: the state hash no longer matches.
        var m3 = m
        m3.tensors[0].shape = [8, 3]
        try m3.encoded().write(to: root.appendingPathComponent("versions/00000001.json"))
        guard case StoreError.stateMismatch? = expectError({ try store.load(.number(1)) }) as? StoreError else { return XCTFail("state mismatch") }
        // A manifest claiming a huge tensor: refused from the frame header, before allocating.
        var m4 = m
        m4.tensors[0].shape = [1 << 30, 64]
        m4.tensors[0].bytes = (1 << 30) * 64 * 4
        try m4.encoded().write(to: root.appendingPathComponent("versions/00000001.json"))
        guard case StoreError.corruptBlob(_, let huge)? = expectError({ try store.load(.number(1)) }) as? StoreError, huge.contains("the frame holds") else {
            return XCTFail("oversized tensor claim")
        }
        // A bad HEAD.
        try Data("banana\n".utf8).write(to: root.appendingPathComponent("HEAD"))
        guard case StoreError.badHead? = expectError({ try store.head() }) as? StoreError else { return XCTFail("bad head") }
    }

    /// The version chain is tamper-evident: editing a manifest's metadata (parent, time, batch, info)
    /// breaks the hash its child, HEAD or its commit record holds; verify reports it, and neither a
    /// rollback nor a commit follows or builds on the edited manifest.
    func testEditedManifestMetadataIsCaught() throws {
        for (what, edit) in [("parent", { (m: inout Manifest) in m.parent = 1 }),
                             ("created", { (m: inout Manifest) in m.created = "2020-01-01T00:00:00.000Z" }),
                             ("batch.sha256", { (m: inout Manifest) in m.batch = BatchReference(name: "x.jsonl", sha256: String(repeating: "cd", count: 32)) }),
                             ("info", { (m: inout Manifest) in m.info = .string("forged") })] as [(String, (inout Manifest) -> Void)] {
            for target in [2, 3] {  // a middle version (its child records it) and HEAD
                let (store, root) = try newStore()
                for k in 1...3 {
                    try store.commit(CommitRequest(tensors: state(UInt64(k)), batch: BatchReference(name: "\(k).jsonl", sha256: String(repeating: "a\(k)", count: 32))))
                }
                XCTAssertTrue(try store.verify().isClean && store.verify().warnings.isEmpty, "\(what)")
                var m = try store.manifest(target)
                edit(&m)
                if target == 2 && what == "parent" { m.parent = nil; m.parentManifestSHA256 = nil }
                try m.encoded().write(to: root.appendingPathComponent(Manifest.fileName(target)))
                let report = try store.verify()
                XCTAssertFalse(report.isClean, "\(what) of \(target)")
                XCTAssertTrue(report.problems.contains { $0.contains("was changed after it was made") }, "\(what) of \(target): \(report.problems)")
                if target == 3 {
                    guard case StoreError.manifestChanged? = expectError({ try store.rollback(steps: 1) }) as? StoreError else { return XCTFail("\(what): rollback") }
                    XCTAssertThrowsError(try store.commit(CommitRequest(tensors: state(9))), "\(what): no commit on an edited HEAD")
                } else {
                    guard case StoreError.manifestChanged? = expectError({ try store.rollback(steps: 1) }) as? StoreError else { return XCTFail("\(what): walk") }
                    XCTAssertThrowsError(try store.rollback(to: .number(2)), "\(what): no rollback onto an edited version")
                }
                XCTAssertEqual(try store.head(), 3)
            }
        }
    }

    func testVerifyCatchesAPlantedCorruptBlob() throws {
        let (store, root) = try newStore()
        try store.commit(CommitRequest(tensors: state(1)))
        let m2 = try store.commit(CommitRequest(tensors: state(2), files: ["log": Data(repeating: 7, count: 100)]))
        var report = try store.verify()
        XCTAssertTrue(report.isClean, "\(report.problems)")
        XCTAssertEqual(report.checkedVersions, 2)
        XCTAssertEqual(report.checkedBlobs, 7)

        try flipByte(in: root.appendingPathComponent("objects/\(m2.tensors[1].parts[0].blob)"), at: 30)
        report = try store.verify()
        XCTAssertFalse(report.isClean)
        XCTAssertTrue(report.problems.contains { $0.contains(m2.tensors[1].parts[0].blob) && $0.contains("hash mismatch") }, "\(report.problems)")
        XCTAssertTrue(report.problems.contains { $0.hasPrefix("version 2") }, "\(report.problems)")
        XCTAssertFalse(report.problems.contains { $0.hasPrefix("version 1") }, "\(report.problems)")

        // A missing blob and a stray file.
        try FileManager.default.removeItem(at: root.appendingPathComponent("objects/\(m2.files[0].blob)"))
        try Data("x".utf8).write(to: root.appendingPathComponent("objects/notes.txt"))
        report = try store.verify()
        XCTAssertTrue(report.problems.contains { $0.contains("missing") }, "\(report.problems)")
        XCTAssertTrue(report.warnings.contains { $0.contains("notes.txt") }, "\(report.warnings)")
    }

    func testGCRemovesOnlyUnreferencedBlobs() throws {
        let (store, root) = try newStore()
        let shared = randomTensor([16], seed: 500)
        var manifests: [Manifest] = []
        for seed in 1...5 {
            var s = state(UInt64(seed))
            s["shared"] = shared
            manifests.append(try store.commit(CommitRequest(tensors: s)))
        }
        try store.rollback(to: .number(2))
        // Nothing unreferenced: gc without --keep removes nothing.
        var report = try store.gc()
        XCTAssertEqual(report.removedBlobs, [])
        XCTAssertEqual(report.removedVersions, [])
        // Plant an unreferenced blob (a real blob of no version) while the store is open.
        let stray = try BlobCodec.encode(UnsafeRawBufferPointer(start: shared.data, count: 4), level: 3)
        let strayHash = stray.withUnsafeBytes { SHA256Hex.of($0) }
        try Data(stray).write(to: root.appendingPathComponent("objects/\(strayHash)"))
        report = try store.gc()
        XCTAssertEqual(report.removedBlobs, [strayHash])

        // --keep 2: HEAD (2) and the two newest (4, 5) stay.
        report = try store.gc(keep: 2)
        XCTAssertEqual(report.keptVersions, [2, 4, 5])
        XCTAssertEqual(report.removedVersions, [1, 3])
        XCTAssertEqual(try store.versions(), [2, 4, 5])
        let remaining = Set(try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("objects").path))
        let expected = Set([2, 4, 5].flatMap { manifests[$0 - 1].tensors.flatMap { $0.parts.map(\.blob) } })
        XCTAssertEqual(remaining, expected)
        XCTAssertTrue(remaining.contains(manifests[0].tensors.first { $0.name == "shared" }!.parts[0].blob), "shared blob kept")
        for v in [2, 4, 5] { assertStatesEqual(try store.loadTensors(.number(v)), { var s = state(UInt64(v)); s["shared"] = shared; return s }()) }
        let verify = try store.verify()
        XCTAssertTrue(verify.isClean, "\(verify.problems)")
        XCTAssertTrue(verify.warnings.contains { $0.contains("parent 3") }, "\(verify.warnings)")
        // Numbers are never reused, even for removed versions.
        try store.rollback(to: .number(5))
        XCTAssertEqual(try store.commit(CommitRequest(tensors: state(9))).version, 6)
        _ = try store.gc(keep: 0)
        XCTAssertEqual(try store.versions(), [6])
        XCTAssertEqual(try store.commit(CommitRequest(tensors: state(10))).version, 7)
        XCTAssertEqual(try store.history().filter { $0.op == .gc }.count, 3)
        XCTAssertThrowsError(try store.gc(keep: -1))
    }

    /// A version committed with `replay_edits` is format 3 and names the versions it is rebuilt from; gc
    /// keeps them with it, verify reports one that is missing, and a non-positive count is refused.
    func testReplayChainsSurviveGCAndAreVerified() throws {
        let (store, root) = try newStore()
        XCTAssertEqual(try store.commit(CommitRequest(tensors: state(1), replayEdits: 2)).format, Manifest.replayFormat)
        XCTAssertEqual(try store.commit(CommitRequest(tensors: state(2))).format, Manifest.singleBlobFormat)  // whole
        try store.commit(CommitRequest(tensors: state(3), replayEdits: 1))
        try store.commit(CommitRequest(tensors: state(4), replayEdits: 3))
        XCTAssertThrowsError(try store.commit(CommitRequest(tensors: state(5), replayEdits: 0)))
        var chain = try store.replayChain(of: 4)
        XCTAssertEqual(chain.base, 2)
        XCTAssertEqual(chain.versions.map(\.version), [3, 4])
        chain = try store.replayChain(of: 1)
        XCTAssertNil(chain.base, "rebuilt from the empty state")
        XCTAssertEqual(chain.versions.map(\.version), [1])
        XCTAssertEqual(try store.replayChain(of: 2).versions.map(\.version), [])
        // gc --keep 1 keeps HEAD (4) and what it is rebuilt from (3, 2); version 1 goes.
        let report = try store.gc(keep: 1)
        XCTAssertEqual(report.keptVersions, [2, 3, 4])
        XCTAssertEqual(try store.versions(), [2, 3, 4])
        XCTAssertTrue(try store.verify().isClean)
        // A missing link is an error for the chain and a problem for verify.
        try FileManager.default.removeItem(at: root.appendingPathComponent(Manifest.fileName(3)))
        XCTAssertThrowsError(try store.replayChain(of: 4)) { error in
            guard case StoreError.replayChainBroken(4, 3) = error else { return XCTFail("\(error)") }
        }
        XCTAssertTrue(try store.verify().problems.contains { $0.contains("parent 3, which its state is rebuilt from, is missing") })
    }

    /// A whole version may leave out tensors its editor derives from the rest (`derived`): format 4, the
    /// names sorted. A commit refuses a derived name that is also stored, repeated, empty, or on a version
    /// stored in part; a manifest whose format and `derived` disagree is refused when read.
    func testDerivedTensorsAreNamedInFormat4() throws {
        let (store, root) = try newStore()
        let w = "transformer.h.2.mlp.c_fc.delta_weight", other = "transformer.h.3.mlp.c_fc.delta_weight"
        var rest = state(1)
        rest[w] = nil
        let m = try store.commit(CommitRequest(tensors: rest, derived: [w, other].reversed()))
        XCTAssertEqual(m.format, Manifest.derivedFormat)
        XCTAssertEqual(m.derived, [w, other])
        XCTAssertTrue(m.needsEditor)
        XCTAssertEqual(Set(try store.loadTensors(.number(1)).keys), Set(rest.keys))
        XCTAssertNil(try store.commit(CommitRequest(tensors: state(2))).derived, "nothing derived: no list, format 1")
        XCTAssertEqual(try store.manifest(2).format, Manifest.singleBlobFormat)
        for (request, why) in [(CommitRequest(tensors: state(3), derived: [w]), "also stored"),
                               (CommitRequest(tensors: rest, derived: [other, other]), "repeated"),
                               (CommitRequest(tensors: rest, derived: [""]), "empty"),
                               (CommitRequest(tensors: rest, replayEdits: 2, derived: [w]), "stored in part")] {
            guard case StoreError.invalidCommit(let reason)? = expectError({ try store.commit(request) }) as? StoreError,
                  reason.contains(why) else { return XCTFail("\(why): \(String(describing: expectError { try store.commit(request) }))") }
        }
        XCTAssertEqual(try store.versions(), [1, 2], "nothing committed by a refused request")
        // Format and list must agree, either way.
        let path = root.appendingPathComponent(Manifest.fileName(1))
        var noList = m
        noList.derived = nil
        var wrongFormat = try store.manifest(2)
        wrongFormat.derived = [w]
        for (bad, file) in [(noList, path), (wrongFormat, root.appendingPathComponent(Manifest.fileName(2)))] {
            try bad.encoded().write(to: file)
            guard case StoreError.badManifest(_, let why)? = expectError({ try store.manifest(bad.version) }) as? StoreError,
                  why.contains("derived") else { return XCTFail("version \(bad.version): format and derived disagree") }
        }
    }

    func testGCRefusesWhenAManifestIsUnreadable() throws {
        let (store, root) = try newStore()
        try store.commit(CommitRequest(tensors: state(1)))
        let m2 = try store.commit(CommitRequest(tensors: state(2)))
        try Data("{".utf8).write(to: root.appendingPathComponent("versions/00000001.json"))
        guard case StoreError.gcRefused? = expectError({ try store.gc() }) as? StoreError else { return XCTFail("gc on a damaged store") }
        // Opening does not drop the damaged version's blobs either.
        let reopened = try CheckpointStore(at: root)
        XCTAssertNotNil(reopened.recovery?.blobCleanupSkipped)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("objects").path).count, 6)
        assertStatesEqual(try reopened.loadTensors(.number(m2.version)), state(2))
    }

    func testOpenCleansLeftovers() throws {
        let (store, root) = try newStore()
        try store.commit(CommitRequest(tensors: state(1)))
        // What an interrupted commit leaves: temp files, a blob no manifest names, a torn history line.
        try Data("partial".utf8).write(to: root.appendingPathComponent("objects/.tmp-0123"))
        try Data("partial".utf8).write(to: root.appendingPathComponent("versions/.tmp-4567"))
        try Data("9".utf8).write(to: root.appendingPathComponent(".tmp-HEAD"))
        try FileManager.default.createDirectory(at: root.appendingPathComponent(".tmp-restore-x/dafnet-archive"), withIntermediateDirectories: true)
        let orphan = try BlobCodec.encode(UnsafeRawBufferPointer(start: nil, count: 0), level: 1)
        let orphanHash = orphan.withUnsafeBytes { SHA256Hex.of($0) }
        try Data(orphan).write(to: root.appendingPathComponent("objects/\(orphanHash)"))
        let history = try FileHandle(forWritingTo: root.appendingPathComponent("history.jsonl"))
        history.seekToEndOfFile()
        history.write(Data("{\"op\":\"comm".utf8))
        history.closeFile()

        // A reader's open cleans what a read could trip over and leaves the unreferenced blob (finding it
        // reads every manifest) to the next writer's open.
        let reader = try CheckpointStore(at: root, recover: .leftovers)
        let read = try XCTUnwrap(reader.recovery)
        XCTAssertEqual(read.removedTemporary.count, 4)
        XCTAssertTrue(read.truncatedHistory)
        XCTAssertEqual(read.removedBlobs, [])
        XCTAssertTrue(FileManager.default.fileExists(atPath: root.appendingPathComponent("objects/\(orphanHash)").path))
        XCTAssertEqual(try reader.head(), 1)

        let reopened = try CheckpointStore(at: root)
        let report = try XCTUnwrap(reopened.recovery)
        XCTAssertEqual(report.removedTemporary.count, 0)
        XCTAssertEqual(report.removedBlobs, [orphanHash])
        XCTAssertFalse(report.truncatedHistory)
        XCTAssertEqual(try reopened.history().count, 1)
        XCTAssertEqual(try reopened.head(), 1)
        let verify = try reopened.verify()
        XCTAssertTrue(verify.isClean && verify.warnings.isEmpty, "\(verify)")
    }

    func testHeadWithoutHistoryRecordIsRecorded() throws {
        let (store, root) = try newStore()
        try store.commit(CommitRequest(tensors: state(1)))
        try store.commit(CommitRequest(tensors: state(2)))
        // As if a crash came between HEAD's rename and the history append of a rollback.
        try Data("1\n".utf8).write(to: root.appendingPathComponent("HEAD"))
        let reopened = try CheckpointStore(at: root)
        XCTAssertEqual(reopened.recovery?.recordedHead, true)
        XCTAssertEqual(try reopened.history().last?.op, .recover)
        XCTAssertEqual(try reopened.history().last?.version, 1)
    }

    /// HEAD lost, garbage or naming a missing version: the store refuses to commit (no silent new root,
    /// no jump of the version numbers), `verify` reports it, and `repairHead` sets it again.
    func testHeadFaultsRefuseCommitsAndRepair() throws {
        let (store, root) = try newStore()
        for k in 1...3 { try store.commit(CommitRequest(tensors: state(UInt64(k)))) }
        try store.rollback(to: .number(2))
        let headURL = root.appendingPathComponent("HEAD")
        for (fault, apply) in [("deleted", { try FileManager.default.removeItem(at: headURL) }),
                               ("empty", { try Data().write(to: headURL) }),
                               ("garbage", { try Data("\u{1}zz\n".utf8).write(to: headURL) }),
                               ("missing version", { try Data("99\n".utf8).write(to: headURL) })] as [(String, () throws -> Void)] {
            try apply()
            let reopened = try CheckpointStore(at: root)
            XCTAssertEqual(reopened.recovery?.recordedHead, false, fault)
            XCTAssertEqual(reopened.recovery?.removedUnfinishedVersions, [], "\(fault): nothing removed while HEAD is bad")
            guard case StoreError.badHead? = expectError({ try reopened.head() }) as? StoreError else { return XCTFail(fault) }
            XCTAssertThrowsError(try reopened.commit(CommitRequest(tensors: state(9))), fault)
            XCTAssertEqual(try reopened.versions(), [1, 2, 3], fault)
            XCTAssertFalse(try reopened.verify().isClean, fault)
            let record = try XCTUnwrap(try reopened.repairHead(), fault)
            XCTAssertEqual(record.version, 2, "\(fault): the history's last HEAD")
            XCTAssertEqual(try reopened.head(), 2, fault)
            XCTAssertTrue(try reopened.verify().isClean, fault)
            XCTAssertNil(try reopened.repairHead(), "\(fault): nothing left to repair")
        }
        // The next commit builds on the repaired HEAD with the next number.
        let m = try store.commit(CommitRequest(tensors: state(4)))
        XCTAssertEqual(m.version, 4)
        XCTAssertEqual(m.parent, 2)
        // --to V moves it explicitly.
        try FileManager.default.removeItem(at: headURL)
        XCTAssertEqual(try store.repairHead(to: 3)?.version, 3)
        XCTAssertThrowsError(try store.repairHead(to: 77))
    }

    /// Rolling back to the unedited base: HEAD `0`, no current version (not a fault), the versions stay
    /// and can be rolled forward to, and the next commit is a new root.
    func testRollbackToBase() throws {
        let (store, root) = try newStore()
        try store.commit(CommitRequest(tensors: state(1)))
        try store.commit(CommitRequest(tensors: state(2)))
        let r = try store.rollbackToBase()
        XCTAssertEqual(r.from, 2)
        XCTAssertNil(r.version)
        XCTAssertNil(try store.head())
        XCTAssertEqual(try String(contentsOf: root.appendingPathComponent("HEAD"), encoding: .utf8), "0\n")
        let reopened = try CheckpointStore(at: root)
        XCTAssertNil(try reopened.head())
        XCTAssertEqual(reopened.recovery?.removedUnfinishedVersions, [])
        XCTAssertTrue(try reopened.verify().isClean)
        let m = try reopened.commit(CommitRequest(tensors: state(3)))
        XCTAssertEqual(m.version, 3)
        XCTAssertNil(m.parent)
        try reopened.rollback(to: .number(2))
        assertStatesEqual(try reopened.loadTensors(), state(2))
    }

    /// A store that lost store.json says how to repair it; repairMarker writes it again, and only where
    /// a store's versions or blobs remain.
    func testMissingMarkerIsRepaired() throws {
        let (store, root) = try newStore()
        try store.commit(CommitRequest(tensors: state(1)))
        try FileManager.default.removeItem(at: root.appendingPathComponent("store.json"))
        XCTAssertThrowsError(try CheckpointStore(at: root)) { e in
            XCTAssertTrue("\(e)".contains("checkpoints repair"), "\(e)")
        }
        XCTAssertTrue(try CheckpointStore.repairMarker(at: root))
        XCTAssertFalse(try CheckpointStore.repairMarker(at: root))
        assertStatesEqual(try CheckpointStore(at: root).loadTensors(), state(1))
        let empty = try makeTemporaryDirectory(self)
        XCTAssertThrowsError(try CheckpointStore.repairMarker(at: empty))
    }

    /// A store the process cannot write opens for reading: list, load, history and verify work (verify
    /// under a shared lock), and a commit fails with an I/O error, changing nothing.
    func testReadOnlyStoreCanBeReadAndVerified() throws {
        let (store, root) = try newStore()
        try store.commit(CommitRequest(tensors: state(1)))
        try store.commit(CommitRequest(tensors: state(2)))
        let paths = [root.path] + (FileManager.default.subpaths(atPath: root.path) ?? []).map { root.path + "/" + $0 }
        for p in paths { XCTAssertEqual(chmod(p, isDir(p) ? 0o555 : 0o444), 0, p) }
        defer { for p in paths { chmod(p, isDir(p) ? 0o755 : 0o644) } }
        // Root writes anywhere: read as nobody.
        let asRoot = geteuid() == 0
        if asRoot { XCTAssertEqual(seteuid(65534), 0) }
        let result = Result { () throws -> (CheckpointStore, VerificationReport) in
            let ro = try CheckpointStore(at: root)
            return (ro, try ro.verify())
        }
        let commit = Result { try CheckpointStore(at: root).commit(CommitRequest(tensors: state(3))) }
        if asRoot { XCTAssertEqual(seteuid(0), 0) }
        let (ro, report) = try result.get()
        XCTAssertNil(ro.recovery)
        XCTAssertTrue(report.isClean, "\(report.problems)")
        XCTAssertEqual(report.checkedVersions, 2)
        XCTAssertEqual(try ro.summaries().map(\.version), [1, 2])
        XCTAssertEqual(try ro.history().count, 2)
        assertStatesEqual(try ro.loadTensors(), state(2))
        XCTAssertThrowsError(try commit.get())
        XCTAssertEqual(try ro.versions(), [1, 2])
    }

    /// The evaluation logs: appended under the lock, read as complete lines, a torn last line cut at
    /// open (and before an append), the old batch log renamed; files in evaluations/ go through the store.
    func testEvaluationLogs() throws {
        let (store, root) = try newStore()
        try store.append(Data("{\"a\":1}".utf8), to: .batches)
        try store.append(Data("{\"a\":2}".utf8), to: .batches)
        try store.append(Data("{\"j\":1}".utf8), to: .journal)
        XCTAssertEqual(try store.lines(of: .batches), [Data("{\"a\":1}".utf8), Data("{\"a\":2}".utf8)])
        XCTAssertThrowsError(try store.append(Data("a\nb".utf8), to: .journal))
        let batches = root.appendingPathComponent("evaluations/batches.jsonl")
        let h = try FileHandle(forWritingTo: batches)
        h.seekToEndOfFile()
        h.write(Data("{\"torn".utf8))
        try h.close()
        XCTAssertEqual(try store.lines(of: .batches).count, 2, "a torn line is not a line")
        try store.append(Data("{\"a\":3}".utf8), to: .batches)
        XCTAssertEqual(try store.lines(of: .batches).last, Data("{\"a\":3}".utf8), "the append cut the torn line first")
        try Data("{\"torn".utf8).write(to: root.appendingPathComponent("evaluations/journal.jsonl"), options: .atomic)
        XCTAssertEqual(try CheckpointStore(at: root).recovery?.truncatedLogs, ["journal.jsonl"])
        XCTAssertEqual(try Data(contentsOf: root.appendingPathComponent("evaluations/journal.jsonl")), Data())

        // A store from before the rename.
        try FileManager.default.moveItem(at: batches, to: root.appendingPathComponent("evaluations/history.jsonl"))
        XCTAssertEqual(try CheckpointStore(at: root).lines(of: .batches).count, 3)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root.appendingPathComponent("evaluations/history.jsonl").path))

        let url = try store.writeEvaluationsFile(Data("<html>".utf8), named: "report.html")
        XCTAssertEqual(try Data(contentsOf: url), Data("<html>".utf8))
        for bad in ["", "a/b", "..", "batches.jsonl", ".tmp-x"] { XCTAssertThrowsError(try store.writeEvaluationsFile(Data(), named: bad), bad) }
    }

    func testEvaluationFiles() throws {
        let (store, root) = try newStore()
        try store.commit(CommitRequest(tensors: state(1)))
        let url = try store.writeEvaluationFile(Data("{\"reliability\":1}".utf8), named: "details/evaluation.json", for: 1)
        XCTAssertEqual(url.path, root.appendingPathComponent("evaluations/v00000001/details/evaluation.json").path)
        XCTAssertEqual(try Data(contentsOf: url), Data("{\"reliability\":1}".utf8))
        for bad in ["", "/abs", "../x", "a/../b", "a//b"] {
            XCTAssertThrowsError(try store.writeEvaluationFile(Data(), named: bad, for: 1), bad)
        }
        XCTAssertThrowsError(try store.writeEvaluationFile(Data(), named: "x.json", for: 2))
        // A temporary file left in an evaluation folder is cleaned on open.
        try Data("torn".utf8).write(to: root.appendingPathComponent("evaluations/v00000001/details/.tmp-123"))
        let reopened = try CheckpointStore(at: root)
        XCTAssertEqual(reopened.recovery?.removedTemporary.count, 1)
        XCTAssertTrue(FileManager.default.fileExists(atPath: url.path))
    }

    func testBenchmarkRuns() throws {
        let state = StoreBenchmark.syntheticEditState(blocks: 1, dModel: 16, rank: 2)
        XCTAssertEqual(state.count, 4)
        XCTAssertEqual(state["transformer.h.0.mlp.c_fc.delta_weight"]?.shape, [16, 64])
        let results = try StoreBenchmark.run(tensors: state, levels: [1], shuffles: [false, true], repeats: 1,
                                             directory: try makeTemporaryDirectory(self))
        XCTAssertEqual(results.count, 2)
        for r in results {
            XCTAssertGreaterThan(r.ratio, 0.5)
            XCTAssertGreaterThan(r.writeMBps, 0)
            XCTAssertGreaterThan(r.readMBps, 0)
        }
        XCTAssertTrue(StoreBenchmark.table(results).contains("yes"))
    }

    func testOpeningRules() throws {
        let dir = try makeTemporaryDirectory(self)
        guard case StoreError.storeNotFound? = expectError({ try CheckpointStore(at: dir.appendingPathComponent("none")) }) as? StoreError else {
            return XCTFail("missing store")
        }
        let foreign = dir.appendingPathComponent("foreign")
        try FileManager.default.createDirectory(at: foreign, withIntermediateDirectories: true)
        try Data("x".utf8).write(to: foreign.appendingPathComponent("file.txt"))
        guard case StoreError.notAStore? = expectError({ try CheckpointStore(at: foreign, create: true) }) as? StoreError else {
            return XCTFail("a folder with other files is not made into a store")
        }
        XCTAssertTrue(FileManager.default.fileExists(atPath: foreign.appendingPathComponent("file.txt").path))
        // A folder with only hidden files (a .gitkeep) can become a store.
        let kept = dir.appendingPathComponent("kept")
        try FileManager.default.createDirectory(at: kept, withIntermediateDirectories: true)
        try Data().write(to: kept.appendingPathComponent(".gitkeep"))
        guard case StoreError.storeNotFound? = expectError({ try CheckpointStore(at: kept) }) as? StoreError else { return XCTFail() }
        let store = try CheckpointStore(at: kept, create: true)
        XCTAssertEqual(try store.versions(), [])
        XCTAssertNoThrow(try CheckpointStore(at: kept))
        XCTAssertThrowsError(try store.commit(CommitRequest(tensors: ["": Tensor(shape: [1])])))
        XCTAssertThrowsError(try store.commit(CommitRequest(tensors: [:], baseModelSHA256: "XYZ")))
        XCTAssertEqual(store.evaluationsDirectory(for: 12).lastPathComponent, "v00000012")
        // An interrupted creation (folders made, no marker yet) can be completed.
        let half = dir.appendingPathComponent("half")
        for sub in ["objects", "versions"] {
            try FileManager.default.createDirectory(at: half.appendingPathComponent(sub), withIntermediateDirectories: true)
        }
        try Data().write(to: half.appendingPathComponent("history.jsonl"))
        XCTAssertNoThrow(try CheckpointStore(at: half, create: true))
    }

    func testLockExcludesConcurrentMutations() throws {
        let (store, root) = try newStore()
        let other = try CheckpointStore(at: root, configuration: StoreConfiguration(lockTimeout: 0.2))
        let error: Error? = try store.withLock {
            expectError { try other.commit(CommitRequest(tensors: state(1))) }
        }
        guard case StoreError.locked? = error as? StoreError else { return XCTFail("\(String(describing: error))") }
        XCTAssertEqual(try other.versions(), [])
        XCTAssertNoThrow(try other.commit(CommitRequest(tensors: state(1))))
    }

    func testDiff() throws {
        let (store, _) = try newStore()
        let a = Tensor(shape: [2, 2], values: [1, 2, 3, 4])
        let b = Tensor(shape: [2, 2], values: [1, 2, 3, 7])
        try store.commit(CommitRequest(tensors: ["w": a, "same": a, "gone": a, "shape": a]))
        try store.commit(CommitRequest(tensors: ["w": b, "same": a, "new": b, "shape": a.reshaped([4])]))
        let diff = try store.diff(.number(1), .head)
        let byName = Dictionary(uniqueKeysWithValues: diff.map { ($0.name, $0) })
        XCTAssertEqual(byName["w"]?.status, .changed)
        XCTAssertEqual(byName["w"]?.maxAbsDifference, 3)
        XCTAssertEqual(byName["w"]?.differenceNorm, 3)
        XCTAssertEqual(byName["w"]?.normB ?? 0, (1 + 4 + 9 + 49.0).squareRoot(), accuracy: 1e-12)
        XCTAssertEqual(byName["same"]?.status, .unchanged)
        XCTAssertEqual(byName["same"]?.maxAbsDifference, 0)
        XCTAssertEqual(byName["gone"]?.status, .removed)
        XCTAssertEqual(byName["new"]?.status, .added)
        XCTAssertEqual(byName["shape"]?.status, .reshaped)
        XCTAssertEqual(try store.summaries().map(\.isHead), [false, true])
    }
}

/// sha256 hex, for planting files under their own hash.
enum SHA256Hex {
    static func of(_ buffer: UnsafeRawBufferPointer) -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sha-" + UUID().uuidString)
        defer { try? FileManager.default.removeItem(at: dir) }
        try? Data(buffer).write(to: dir)
        return (try? FileHash.sha256(ofFileAt: dir)) ?? ""
    }
}

private func isDir(_ path: String) -> Bool {
    var d: ObjCBool = false
    return FileManager.default.fileExists(atPath: path, isDirectory: &d) && d.boolValue
}
