import Foundation
import Storage
import TensorCore
import XCTest

/// Wraps the real file system and makes the `failAt`-th step fail. `crash`: that step and every
/// later one fail, as if the process died there (a write leaves half its bytes, like a torn
/// write). `transient`: only that step fails and the store's own clean-up runs. The steps that pass
/// go to the real file system (fsync skipped, see `NoSyncFileSystem`).
final class FaultInjectingFileSystem: StoreFileSystem, @unchecked Sendable {
    enum Mode { case crash, transient }
    struct InjectedFault: Error, CustomStringConvertible {
        let step: String
        var description: String { "injected fault at \(step)" }
    }

    let real = NoSyncFileSystem()
    let failAt: Int
    let mode: Mode
    private(set) var calls = 0
    private(set) var steps: [String] = []
    private var dead = false

    init(failAt: Int, mode: Mode) {
        self.failAt = failAt
        self.mode = mode
    }

    enum Outcome { case proceed, failHere, alreadyDead }

    /// Counts a step and decides its fate.
    private func gate(_ step: String) -> Outcome {
        if dead { return .alreadyDead }
        calls += 1
        steps.append(step)
        guard calls == failAt else { return .proceed }
        if mode == .crash { dead = true }
        return .failHere
    }

    private func fails(_ step: String) -> Bool { gate(step) != .proceed }

    private func name(_ path: String) -> String { (path as NSString).lastPathComponent }

    func writeNewFile(atPath path: String, contents: UnsafeRawBufferPointer) throws {
        switch gate("write \(name(path))") {
        case .proceed: try real.writeNewFile(atPath: path, contents: contents)
        case .failHere:
            // A torn write: half the bytes reach the file.
            try? real.writeNewFile(atPath: path, contents: UnsafeRawBufferPointer(rebasing: contents.prefix(contents.count / 2)))
            throw InjectedFault(step: "write \(path)")
        case .alreadyDead: throw InjectedFault(step: "write \(path)")
        }
    }

    func append(toFileAtPath path: String, contents: UnsafeRawBufferPointer) throws {
        switch gate("append \(name(path))") {
        case .proceed: try real.append(toFileAtPath: path, contents: contents)
        case .failHere:
            try? real.append(toFileAtPath: path, contents: UnsafeRawBufferPointer(rebasing: contents.prefix(contents.count / 2)))
            throw InjectedFault(step: "append \(path)")
        case .alreadyDead: throw InjectedFault(step: "append \(path)")
        }
    }

    func syncFile(atPath path: String) throws {
        if fails("fsync \(name(path))") { throw InjectedFault(step: "fsync \(path)") }
        try real.syncFile(atPath: path)
    }

    func rename(atPath from: String, toPath to: String) throws {
        if fails("rename → \(name(to))") { throw InjectedFault(step: "rename \(from) → \(to)") }
        try real.rename(atPath: from, toPath: to)
    }

    func syncDirectory(atPath path: String) throws {
        if fails("fsync dir \(name(path))") { throw InjectedFault(step: "fsync dir \(path)") }
        try real.syncDirectory(atPath: path)
    }

    func removeFile(atPath path: String) throws {
        if fails("remove \(name(path))") { throw InjectedFault(step: "remove \(path)") }
        try real.removeFile(atPath: path)
    }
}

final class CrashInjectionTests: XCTestCase {
    let stateA: [String: Tensor] = [
        "h.0.mlp.c_fc.dw": randomTensor([16, 32], seed: 1),
        "h.0.mlp.c_proj.dw": randomTensor([32, 16], seed: 2),
        "h.0.mlp.c_fc.db": randomTensor([32], seed: 3),
    ]
    /// Shares one tensor with A (dedup), changes one, adds one.
    lazy var stateB: [String: Tensor] = [
        "h.0.mlp.c_fc.dw": stateA["h.0.mlp.c_fc.dw"]!,
        "h.0.mlp.c_proj.dw": randomTensor([32, 16], seed: 12),
        "h.0.mlp.c_fc.db": randomTensor([32], seed: 13),
        "h.1.mlp.c_fc.dw": randomTensor([16, 32], seed: 14),
    ]

    /// Files the store should not hold after a clean open: temporary files.
    private func leftovers(_ root: URL) throws -> [String] {
        var out: [String] = []
        for sub in ["", "objects", "versions", "evaluations"] {
            let dir = sub.isEmpty ? root : root.appendingPathComponent(sub)
            out += try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasPrefix(".tmp-") }.map { "\(sub)/\($0)" }
        }
        return out
    }

    /// Checks that the store opens at version `old` with state `a`, or at `new` with state `b`,
    /// and holds nothing else: no temporary files, no unreferenced blobs, verify clean.
    /// `creates`: the operation made version `new` (a commit), which must then be gone when HEAD stayed.
    private func assertOldOrNew(_ root: URL, old: Int, new: Int, a: [String: Tensor], b: [String: Tensor], creates: Bool,
                                context: String, file: StaticString = #filePath, line: UInt = #line) throws -> Int {
        let store = try CheckpointStore(at: root, fileSystem: NoSyncFileSystem())
        let head = try XCTUnwrap(try store.head(), context, file: file, line: line)
        XCTAssertTrue(head == old || head == new, "\(context): HEAD \(head)", file: file, line: line)
        let loaded = try store.loadTensors()
        assertStatesEqual(loaded, head == new ? b : a, context, file: file, line: line)
        // A commit that did not reach HEAD is undone as a whole: its manifest goes too, so the version
        // does not look committed to anyone who lists the store (its batch is still to do).
        if head == old && creates {
            XCTAssertFalse(try store.versions().contains(new), "\(context): the unfinished version \(new) is removed", file: file, line: line)
        } else {
            assertStatesEqual(try store.loadTensors(.number(new)), b, "\(context) (version \(new))", file: file, line: line)
        }
        XCTAssertEqual(try leftovers(root), [], context, file: file, line: line)
        let report = try store.verify()
        XCTAssertEqual(report.problems, [], context, file: file, line: line)
        XCTAssertEqual(report.warnings, [], context, file: file, line: line)
        // Re-opening again finds nothing more to clean.
        XCTAssertEqual(try CheckpointStore(at: root, fileSystem: NoSyncFileSystem()).recovery?.isEmpty, true, context, file: file, line: line)
        return head
    }

    func testCommitFailingAtEveryStepLeavesOldOrNewVersion() throws {
        let base = try makeTemporaryDirectory(self)
        for mode in [FaultInjectingFileSystem.Mode.crash, .transient] {
            var k = 1
            var sawOld = false, sawNew = false
            while true {
                let root = base.appendingPathComponent("\(mode)-\(k)")
                let setup = try CheckpointStore(at: root, create: true, fileSystem: NoSyncFileSystem())
                try setup.commit(CommitRequest(tensors: stateA))
                let faulty = FaultInjectingFileSystem(failAt: k, mode: mode)
                let store = try CheckpointStore(at: root, fileSystem: faulty, recover: .none)
                var succeeded = false
                do {
                    try store.commit(CommitRequest(tensors: stateB, files: ["log.jsonl": Data("{\"edit\":1}\n".utf8)],
                                                   batch: BatchReference(name: "b.jsonl", sha256: String(repeating: "ab", count: 32))))
                    succeeded = true
                } catch let e as StoreError {
                    if case .currentWithError = e {} else if case .io = e { XCTFail("\(mode) k=\(k): \(e)") }
                } catch is FaultInjectingFileSystem.InjectedFault {
                } catch {
                    XCTFail("\(mode) k=\(k): unexpected \(error)")
                }
                if succeeded && faulty.calls < k { break }  // every step has had its turn
                let context = "\(mode), failing step \(k) (\(faulty.steps.last ?? "?"))"
                let head = try assertOldOrNew(root, old: 1, new: 2, a: stateA, b: stateB, creates: true, context: context)
                if head == 1 { sawOld = true } else { sawNew = true }
                k += 1
            }
            XCTAssertGreaterThan(k, 15, "\(mode): the commit protocol has that many steps")
            XCTAssertTrue(sawOld && sawNew, "\(mode)")
        }
    }

    func testRollbackFailingAtEveryStep() throws {
        let base = try makeTemporaryDirectory(self)
        for mode in [FaultInjectingFileSystem.Mode.crash, .transient] {
            var k = 1
            while true {
                let root = base.appendingPathComponent("\(mode)-\(k)")
                let setup = try CheckpointStore(at: root, create: true, fileSystem: NoSyncFileSystem())
                try setup.commit(CommitRequest(tensors: stateA))
                try setup.commit(CommitRequest(tensors: stateB))
                let faulty = FaultInjectingFileSystem(failAt: k, mode: mode)
                let store = try CheckpointStore(at: root, fileSystem: faulty, recover: .none)
                var succeeded = false
                do {
                    try store.rollback(to: .number(1))
                    succeeded = true
                } catch {}
                if succeeded && faulty.calls < k { break }
                _ = try assertOldOrNew(root, old: 2, new: 1, a: stateB, b: stateA, creates: false, context: "\(mode) rollback step \(k)")
                k += 1
            }
            XCTAssertGreaterThanOrEqual(k, 6)
        }
    }

    func testCrashDuringGCLeavesAConsistentStore() throws {
        let base = try makeTemporaryDirectory(self)
        var k = 1
        while true {
            let root = base.appendingPathComponent("gc-\(k)")
            let setup = try CheckpointStore(at: root, create: true, fileSystem: NoSyncFileSystem())
            try setup.commit(CommitRequest(tensors: stateA))
            try setup.commit(CommitRequest(tensors: stateB))
            try setup.commit(CommitRequest(tensors: ["x": randomTensor([8], seed: 40)]))
            let faulty = FaultInjectingFileSystem(failAt: k, mode: .crash)
            let store = try CheckpointStore(at: root, fileSystem: faulty, recover: .none)
            var succeeded = false
            do {
                _ = try store.gc(keep: 1)
                succeeded = true
            } catch {}
            if succeeded && faulty.calls < k { break }
            let reopened = try CheckpointStore(at: root, fileSystem: NoSyncFileSystem())
            XCTAssertEqual(try reopened.head(), 3)
            let report = try reopened.verify()
            XCTAssertEqual(report.problems, [], "gc step \(k)")
            for v in try reopened.versions() { XCTAssertNoThrow(try reopened.load(.number(v)), "gc step \(k) version \(v)") }
            k += 1
        }
        XCTAssertGreaterThan(k, 3)
    }
}
