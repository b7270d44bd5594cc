import Editing
import Evaluation
import Foundation
import Logging
import Storage
import TensorCore
import XCTest
@testable import Pipeline

final class BatchProcessorTests: XCTestCase {
    /// Batches go in file-name order (UTF-8 bytes), whatever order they arrived in; dot-files, `*.tmp`
    /// and non-`.jsonl` files stay where they are.
    func testOrderingAndIgnoredFiles() throws {
        let h = try Harness()
        for (name, k) in [("b.jsonl", 0), ("010.jsonl", 1), ("a.jsonl", 2), ("002.jsonl", 3), ("A.jsonl", 4)] {
            try h.drop(name, try Fixture.batch(k..<(k + 1)))
        }
        try Fixture.batch(9..<10).write(to: h.inboxURL.appendingPathComponent(".hidden.jsonl"))
        try Fixture.batch(9..<10).write(to: h.inboxURL.appendingPathComponent("later.jsonl.tmp"))
        try Data("notes\n".utf8).write(to: h.inboxURL.appendingPathComponent("README.txt"))
        let out = try h.processor.runOnce()
        XCTAssertEqual(out.map(\.batch), ["002.jsonl", "010.jsonl", "A.jsonl", "a.jsonl", "b.jsonl"])
        XCTAssertEqual(out.map(\.status), Array(repeating: .committed, count: 5))
        XCTAssertEqual(try h.store.manifests().map { $0.batch?.name }, ["002.jsonl", "010.jsonl", "A.jsonl", "a.jsonl", "b.jsonl"])
        XCTAssertEqual(try h.store.manifests().map(\.parent), [nil, 1, 2, 3, 4])
        XCTAssertEqual(h.inboxNames(), [".hidden.jsonl", "README.txt", "later.jsonl.tmp"])
        XCTAssertEqual(h.names("done"), ["002.jsonl", "010.jsonl", "A.jsonl", "a.jsonl", "b.jsonl"])
        XCTAssertEqual(h.names("processing"), [])
    }

    /// Symbolic links (to a batch outside the inbox), folders, FIFOs and names that are not UTF-8 are not
    /// taken, each reported with its reason; the batch beside them is.
    func testLinksFoldersFIFOsAndBadNamesAreIgnoredWithAReason() throws {
        let h = try Harness()
        let outside = h.tmp.path("outside.jsonl")
        try Fixture.batch(5..<6).write(to: outside)
        try FileManager.default.createSymbolicLink(atPath: h.inboxURL.appendingPathComponent("link.jsonl").path, withDestinationPath: outside.path)
        try FileManager.default.createDirectory(at: h.inboxURL.appendingPathComponent("dir.jsonl"), withIntermediateDirectories: false)
        XCTAssertEqual(mkfifo(h.inboxURL.appendingPathComponent("fifo.jsonl").path, 0o644), 0)
        var bad = Array((h.inboxURL.path + "/bad").utf8CString.dropLast()) + [CChar(bitPattern: 0xFF)] + Array(".jsonl".utf8CString)
        let fd = bad.withUnsafeMutableBufferPointer { open($0.baseAddress!, O_CREAT | O_WRONLY, 0o644) }
        XCTAssertGreaterThanOrEqual(fd, 0)
        close(fd)
        try h.drop("001.jsonl", try Fixture.batch(0..<1))
        let scan = try h.processor.inbox.scan()
        XCTAssertEqual(scan.candidates.map(\.name), ["001.jsonl"])
        let reasons = Dictionary(uniqueKeysWithValues: scan.ignored.map { ($0.name, $0.reason) })
        XCTAssertEqual(reasons["link.jsonl"], "a symbolic link (never followed)")
        XCTAssertEqual(reasons["dir.jsonl"], "a folder")
        XCTAssertEqual(reasons["fifo.jsonl"], "not a regular file (a FIFO, socket or device)")
        XCTAssertEqual(reasons["bad\u{FFFD}.jsonl"], "the name is not valid UTF-8")
        XCTAssertEqual(try h.processor.runOnce().map(\.batch), ["001.jsonl"])
        XCTAssertEqual(try h.store.versions(), [1])
        XCTAssertTrue(FileManager.default.fileExists(atPath: outside.path), "the link's target is untouched")

        // A link swapped in under a batch's name after the scan is claimed but never followed.
        try FileManager.default.createSymbolicLink(atPath: h.inboxURL.appendingPathComponent("processing/002.jsonl").path, withDestinationPath: outside.path)
        let out = try h.processor.runOnce()
        XCTAssertEqual(out.map(\.status), [.rejected])
        XCTAssertEqual(try h.store.versions(), [1])
    }

    /// Every kind of bad input gives `failed/NAME` and `failed/NAME.error.json` with its line, field and
    /// reason, and changes nothing: HEAD, its state and the version list stay as they were.
    func testBadInputsAreRejectedWithTheirErrorAndChangeNothing() throws {
        let h = try Harness()
        h.processor.settings.unfinishedTimeout = 0  // the empty and unterminated files fail at once here
        try h.drop("000-good.jsonl", try Fixture.batch(0..<2))
        XCTAssertEqual(try h.processor.runOnce().map(\.status), [.committed])
        let stateBefore = try h.headState()
        let good = String(decoding: try EditBatch.line(Fixture.request(5)), as: UTF8.self)
        let longWords = Array(repeating: "word", count: 120).joined(separator: " ")
        let cases: [(name: String, data: Data, line: Int, field: String, reason: String)] = [
            ("01-invalid-json.jsonl", Data((good + "\n{\"prompt\": \"a\", \"target_new\": }\n").utf8), 2, "", "invalid JSON"),
            ("02-bad-utf8.jsonl", Data("{\"prompt\": \"caf".utf8) + Data([0xC3, 0x28]) + Data("\", \"target_new\": \"x\"}\n".utf8), 1, "", "not valid UTF-8"),
            ("03-missing-target.jsonl", Data((good + "\n" + good + "\n{\"prompt\": \"Lyon is in\"}\n").utf8), 3, "target_new", "required but missing"),
            ("04-empty-prompt.jsonl", Data("{\"prompt\": \"   \", \"target_new\": \"x\"}\n".utf8), 1, "prompt", "must not be empty"),
            ("05-wrong-type.jsonl", Data("{\"prompt\": \"Lyon is in\", \"target_new\": 5}\n".utf8), 1, "target_new", "must be a string"),
            ("06-wrong-type-list.jsonl", Data("{\"prompt\": \"Lyon is in\", \"target_new\": \"Spain\", \"rephrase_prompt\": [\"ok\", 7]}\n".utf8),
             1, "rephrase_prompt[1]", "must be a non-empty string"),
            ("07-too-long-chars.jsonl", Data("{\"prompt\": \"\(String(repeating: "a", count: 2001))\", \"target_new\": \"x\"}\n".utf8),
             1, "prompt", "longer than 2000 characters"),
            ("08-too-long-tokens.jsonl", Data((good + "\n{\"prompt\": \"\(longWords)\", \"target_new\": \"x\"}\n").utf8), 2, "prompt",
             "the model takes at most 64"),
            ("09-empty.jsonl", Data(), 0, "", "the file is empty"),
            ("10-no-final-newline.jsonl", Data(good.utf8), 0, "", "does not end with a newline"),
            ("11-not-an-object.jsonl", Data("[1, 2]\n".utf8), 1, "", "a line must be a JSON object"),
            ("12-blank-lines.jsonl", Data("\n  \n".utf8), 0, "", "the file holds no edits"),
            ("13-null-required.jsonl", Data("{\"prompt\": null, \"target_new\": \"x\"}\n".utf8), 1, "prompt", "required but missing"),
            ("14-half-locality.jsonl", Data("{\"prompt\": \"Lyon is in\", \"target_new\": \"x\", \"locality_prompt\": \"Rome is in\"}\n".utf8),
             1, "locality_ground_truth", "required with locality_prompt"),
            ("15-duplicate-key.jsonl", Data((good + "\n{\"prompt\": \"Lyon is in\", \"target_new\": \"x\", \"target_new\": \"y\"}\n").utf8),
             2, "target_new", "appears twice"),
            ("16-duplicate-nested-key.jsonl", Data("{\"prompt\": \"Lyon is in\", \"target_new\": \"x\", \"locality\": [{\"prompt\": \"a\", \"ground_truth\": \"b\", \"prompt\": \"c\"}]}\n".utf8),
             1, "prompt", "appears twice"),
            ("17-case-id-bool.jsonl", Data("{\"prompt\": \"Lyon is in\", \"target_new\": \"x\", \"case_id\": true}\n".utf8),
             1, "case_id", "must be an integer or a string"),
            ("18-long-target.jsonl", Data("{\"prompt\": \"Lyon is in\", \"target_new\": \"\(longWords)\"}\n".utf8), 1, "target_new",
             "the model takes at most 64"),
            ("19-long-rephrase.jsonl", Data("{\"prompt\": \"Lyon is in\", \"target_new\": \"x\", \"rephrase_prompt\": \"\(longWords)\"}\n".utf8),
             1, "rephrase_prompt", "the model takes at most 64"),
            ("20-long-locality.jsonl", Data("{\"prompt\": \"Lyon is in\", \"target_new\": \"x\", \"locality_prompt\": \"\(longWords)\", \"locality_ground_truth\": \"y\"}\n".utf8),
             1, "locality_prompt", "the model takes at most 64"),
            ("21-two-targets.jsonl", Data("{\"prompt\": \"Lyon is in\", \"target_new\": \"x\"}\n{\"prompt\": \"Lyon is in\", \"target_new\": \"y\"}\n".utf8),
             2, "target_new", "line 1 edits the same prompt to \"x\": one target per prompt in a batch"),
        ]
        for c in cases { try h.drop(c.name, c.data) }
        let out = try h.processor.runOnce()
        XCTAssertEqual(out.map(\.batch), cases.map(\.name))
        for (c, o) in zip(cases, out) {
            XCTAssertEqual(o.status, .rejected, c.name)
            let url = h.inboxURL.appendingPathComponent("failed/\(c.name).error.json")
            let e = try JSONDecoder().decode(BatchErrorFile.self, from: Data(contentsOf: url))
            XCTAssertEqual(e.batch, c.name)
            XCTAssertEqual(e.stage, .validation, c.name)
            XCTAssertEqual(e.line, c.line, c.name)
            XCTAssertEqual(e.field, c.field, c.name)
            XCTAssertTrue(e.reason.contains(c.reason), "\(c.name): \(e.reason)")
            XCTAssertEqual(e.head, 1, c.name)
            XCTAssertNil(e.evaluation)
            XCTAssertTrue(FileManager.default.fileExists(atPath: h.inboxURL.appendingPathComponent("failed/\(c.name)").path))
        }
        XCTAssertEqual(try h.store.head(), 1)
        XCTAssertEqual(try h.store.versions(), [1])
        XCTAssertEqual(try h.headState(), stateBefore)
        XCTAssertEqual(h.names("done"), ["000-good.jsonl"])
        XCTAssertEqual(try HistoryReport.load(store: h.storeURL).count, 1, "rejected batches add no history line")
        XCTAssertEqual(h.inboxNames(), [])
    }

    /// A batch still being written (empty, or no final newline) waits, and the batches after it with it,
    /// until it ends with a newline; one left unfinished past the timeout fails with that reason.
    func testUnfinishedBatchWaitsForItsNewline() throws {
        let h = try Harness()
        h.processor.settings.unfinishedTimeout = 100
        let line = String(decoding: try EditBatch.line(Fixture.request(0)), as: UTF8.self)
        let url = h.inboxURL.appendingPathComponent("001.jsonl")
        try Data(line.prefix(20).utf8).write(to: url)
        try h.drop("002.jsonl", try Fixture.batch(1..<2))
        guard case .wait = try h.processor.next() else { return XCTFail("an unfinished batch is not taken") }
        try Data((line + "\n").utf8).write(to: url)
        XCTAssertEqual(try h.processor.next(), .batch("001.jsonl"))
        XCTAssertEqual(try h.processor.runOnce().map(\.status), [.committed, .committed])

        // Unfinished for longer than the timeout: it fails, and the inbox goes on.
        let stale = h.inboxURL.appendingPathComponent("003.jsonl")
        try Data(line.prefix(20).utf8).write(to: stale)
        var times = [timeval(tv_sec: time(nil) - 200, tv_usec: 0), timeval(tv_sec: time(nil) - 200, tv_usec: 0)]
        XCTAssertEqual(utimes(stale.path, &times), 0)
        try h.drop("004.jsonl", try Fixture.batch(2..<3))
        let out = try h.processor.runOnce()
        XCTAssertEqual(out.map(\.status), [.rejected, .committed])
        XCTAssertTrue(out[0].note!.contains("does not end with a newline"), out[0].note!)
    }

    /// A batch the daemon cannot read goes to failed/ with the reason, and the next one is processed (it
    /// used to stay in processing/ and stop the daemon at every start).
    func testUnreadableBatchFailsAndTheInboxGoesOn() throws {
        let h = try Harness()
        try h.drop("001.jsonl", try Fixture.batch(0..<1))
        try h.drop("002.jsonl", try Fixture.batch(1..<2))
        XCTAssertEqual(chmod(h.inboxURL.appendingPathComponent("001.jsonl").path, 0), 0)
        // Root reads any file: run the processor as nobody, owning the folders it writes.
        let asRoot = geteuid() == 0
        if asRoot {
            let root = h.tmp.url.path
            XCTAssertEqual(chown(root, 65534, 65534), 0)
            for sub in FileManager.default.subpaths(atPath: root) ?? [] where !sub.hasSuffix("001.jsonl") {
                XCTAssertEqual(chown(root + "/" + sub, 65534, 65534), 0, sub)
            }
            XCTAssertEqual(setegid(65534), 0)
            XCTAssertEqual(seteuid(65534), 0)
        }
        let out = Result { try h.processor.runOnce() }
        if asRoot {
            XCTAssertEqual(seteuid(0), 0)
            XCTAssertEqual(setegid(0), 0)
        }
        let outcomes = try out.get()
        XCTAssertEqual(outcomes.map(\.status), [.rejected, .committed])
        XCTAssertTrue(outcomes[0].note!.contains("cannot read the file"), outcomes[0].note!)
        XCTAssertEqual(h.names("failed"), ["001.jsonl", "001.jsonl.error.json"])
        XCTAssertEqual(h.names("processing"), [])
    }

    /// A daemon whose model is not the base HEAD was made on refuses to commit on it (an error naming
    /// both weight hashes; the batch stays claimed for a corrected restart), unless told otherwise.
    func testHeadFromAnotherBaseModelIsRefused() throws {
        let h = try Harness()
        try h.drop("001.jsonl", try Fixture.batch(0..<1))
        try h.processor.runOnce()
        var other = h.processor.resources
        other.baseModelSHA256 = String(repeating: "ab", count: 32)
        let wrong = try BatchProcessor(inbox: h.inbox, store: h.store, editor: h.editor, resources: other,
                                       settings: h.processor.settings, logger: h.processor.logger)
        try h.drop("002.jsonl", try Fixture.batch(1..<2))
        XCTAssertThrowsError(try wrong.runOnce()) { e in
            guard case StoreError.baseModelMismatch(1, let stored, let given)? = e as? StoreError else { return XCTFail("\(e)") }
            XCTAssertEqual(stored, h.processor.resources.baseModelSHA256)
            XCTAssertEqual(given, other.baseModelSHA256)
        }
        XCTAssertEqual(try h.store.versions(), [1])
        XCTAssertEqual(h.names("processing"), ["002.jsonl"])
        wrong.settings.allowOtherBaseModel = true
        XCTAssertEqual(try wrong.runOnce().map(\.status), [.committed])
    }

    /// A re-dropped identical batch (same bytes, any name) is a no-op with a note, not a second application.
    func testDuplicateBatchIsANoOp() throws {
        let h = try Harness()
        let data = try Fixture.batch(0..<3)
        try h.drop("001-first.jsonl", data)
        try h.processor.runOnce()
        let state = try h.headState()
        try h.drop("002-again.jsonl", data)
        try h.drop("001-first.jsonl", data)
        let out = try h.processor.runOnce()
        XCTAssertEqual(out.map(\.status), [.duplicate, .duplicate])
        XCTAssertEqual(out.map(\.version), [1, 1])
        XCTAssertTrue(out[0].note!.contains("001-first.jsonl"), out[0].note!)
        XCTAssertEqual(try h.store.versions(), [1])
        XCTAssertEqual(try h.headState(), state)
        XCTAssertEqual(h.names("done"), ["001-first.jsonl", "001-first~2.jsonl", "002-again.jsonl"])
        let journal = try h.store.lines(of: .journal).map { try JSONDecoder().decode(JournalEntry.self, from: $0) }
        XCTAssertEqual(journal.map(\.status), [.committed, .duplicate, .duplicate])
        XCTAssertEqual(Set(journal.map(\.sha256)).count, 1)
        // A new processor (a restart) knows the batch from the journal and the store.
        let restarted = try BatchProcessor(inbox: h.inbox, store: h.store, editor: h.editor, resources: h.processor.resources,
                                           settings: h.processor.settings, logger: h.processor.logger)
        try h.drop("003-third.jsonl", data)
        XCTAssertEqual(try restarted.runOnce().map(\.status), [.duplicate])
    }

    /// A duplicate is a batch HEAD's lineage holds: after a rollback past a batch, the same batch applies
    /// again (and gives the same state as the first time); one still in the lineage stays a duplicate,
    /// also once `gc` removed the version that committed it.
    func testRollbackPastABatchAppliesItAgain() throws {
        let h = try Harness(keyframeEdits: 0)  // whole versions: gc may remove any but HEAD
        try h.drop("001.jsonl", try Fixture.batch(0..<2))
        try h.drop("002.jsonl", try Fixture.batch(2..<4))
        try h.processor.runOnce()
        let v2 = try h.store.manifest(2)
        try h.store.rollback(to: .number(1))
        try h.drop("002-again.jsonl", try Fixture.batch(2..<4))
        let again = try h.processor.runOnce()
        XCTAssertEqual(again.map(\.status), [.committed], "HEAD no longer holds 002")
        let v3 = try h.store.manifest(3)
        XCTAssertEqual(v3.parent, 1)
        XCTAssertEqual(v3.stateSHA256, v2.stateSHA256, "the same batch on the same parent gives the same state")
        try h.drop("001-again.jsonl", try Fixture.batch(0..<2))
        XCTAssertEqual(try h.processor.runOnce().map(\.status), [.duplicate], "001 is in HEAD's lineage")

        try h.store.gc(keep: 0)
        XCTAssertEqual(try h.store.versions(), [3])
        let restarted = try BatchProcessor(inbox: h.inbox, store: h.store, editor: h.editor, resources: h.processor.resources,
                                           settings: h.processor.settings, logger: h.processor.logger)
        try h.drop("001-third.jsonl", try Fixture.batch(0..<2))
        let third = try restarted.runOnce()
        XCTAssertEqual(third.map(\.status), [.duplicate], "version 1 is gone, but the records say HEAD descends from it")
        XCTAssertEqual(third.map(\.version), [1])

        // Back to the unedited model: every batch applies again, from a new root.
        try h.store.rollbackToBase()
        try h.drop("001-fourth.jsonl", try Fixture.batch(0..<2))
        let fourth = try restarted.runOnce()
        XCTAssertEqual(fourth.map(\.status), [.committed])
        XCTAssertNil(try h.store.manifest(fourth[0].version!).parent)
    }

    /// What a version holds: its lineage's edits, batch by batch (a rolled-back branch is not in it).
    func testLineageEditsOfAVersion() throws {
        let h = try Harness()
        try h.drop("001.jsonl", try Fixture.batch(0..<2))
        try h.drop("002.jsonl", try Fixture.batch(2..<5))
        try h.processor.runOnce()
        try h.store.rollback(to: .number(1))
        try h.drop("003.jsonl", try Fixture.batch(5..<6))
        try h.processor.runOnce()
        let parts = try EditLog.lineage(of: 3, in: h.store)
        XCTAssertEqual(parts.map(\.version), [1, 3])
        XCTAssertEqual(parts.map(\.batch), ["001.jsonl", "003.jsonl"])
        XCTAssertEqual(parts.map { $0.edits.map(\.prompt) }, [[0, 1].map { Fixture.request($0).prompt }, [Fixture.request(5).prompt]])
        XCTAssertEqual(try EditLog.lineage(of: 2, in: h.store).map { $0.edits.count }, [2, 3])
    }

    /// A crash after a commit wrote its manifest and before HEAD named it: the store undoes the commit
    /// when it is opened, and the batch (still in processing/) is applied on HEAD, so no edit is lost
    /// and the next batch does not skip it.
    func testCrashBeforeHeadMovedAppliesTheBatchAgain() throws {
        let h = try Harness()
        try h.drop("001.jsonl", try Fixture.batch(0..<2))
        try h.drop("002.jsonl", try Fixture.batch(2..<4))
        try h.processor.runOnce()
        let v2 = try h.store.manifest(2)
        // What the crash leaves: version 2's manifest, HEAD still at 1, no history record, the batch in
        // processing/ and none of the steps after the commit.
        try Data("1\n".utf8).write(to: h.storeURL.appendingPathComponent("HEAD"))
        let storeHistory = h.storeURL.appendingPathComponent("history.jsonl")
        let records = try Data(contentsOf: storeHistory).split(separator: UInt8(ascii: "\n"))
        try Data(records.dropLast().map { Data($0) + Data("\n".utf8) }.reduce(Data(), +)).write(to: storeHistory)
        for f in EvaluationLog.allCases.map({ h.store.evaluationsFolder.appendingPathComponent($0.rawValue) }) {
            let lines = try Data(contentsOf: f).split(separator: UInt8(ascii: "\n"))
            try Data(lines.dropLast().map { Data($0) + Data("\n".utf8) }.reduce(Data(), +)).write(to: f)
        }
        try FileManager.default.removeItem(at: h.processor.evaluationsFolder.appendingPathComponent("002.v0002.json"))
        try FileManager.default.removeItem(at: h.store.evaluationsDirectory(for: 2))
        try FileManager.default.moveItem(at: h.inboxURL.appendingPathComponent("done/002.jsonl"),
                                         to: h.inboxURL.appendingPathComponent("processing/002.jsonl"))

        let reopened = try CheckpointStore(at: h.storeURL)
        XCTAssertEqual(reopened.recovery?.removedUnfinishedVersions, [2])
        let restarted = try BatchProcessor(inbox: h.inbox, store: reopened, editor: h.editor, resources: h.processor.resources,
                                           settings: h.processor.settings, logger: h.processor.logger)
        try h.drop("003.jsonl", try Fixture.batch(4..<6))
        let out = try restarted.runOnce()
        XCTAssertEqual(out.map(\.status), [.committed, .committed])
        XCTAssertEqual(try reopened.versions(), [1, 2, 3])
        XCTAssertEqual(try reopened.manifest(2).parent, 1)
        XCTAssertEqual(try reopened.manifest(2).stateSHA256, v2.stateSHA256)
        XCTAssertEqual(try reopened.manifest(3).parent, 2, "the next batch builds on 002")
        XCTAssertEqual(h.names("done"), ["001.jsonl", "002.jsonl", "003.jsonl"])
    }

    /// `dafnet rollback` works while the daemon runs (it holds its own lock, not the store's), and the next
    /// batch applies on the rolled-back version; also when the rollback lands while a batch is being
    /// prepared: the batch starts again from the new HEAD.
    func testRollbackWhileRunning() throws {
        let h = try Harness()
        let lock = try DaemonLock(store: h.storeURL)
        _ = lock
        try h.drop("001.jsonl", try Fixture.batch(0..<2))
        try h.drop("002.jsonl", try Fixture.batch(2..<4))
        try h.processor.runOnce()
        XCTAssertEqual(try h.store.head(), 2)
        // Another process's rollback (a second store handle, as `dafnet rollback` opens one).
        try CheckpointStore(at: h.storeURL).rollback(to: .number(1))
        try h.drop("003.jsonl", try Fixture.batch(4..<6))
        try h.processor.runOnce()
        let v3 = try h.store.manifest(3)
        XCTAssertEqual(v3.parent, 1)
        XCTAssertEqual(try h.store.head(), 3)
        XCTAssertEqual(try EditLog.load(from: h.store, version: 3).count, 4, "the edit log follows the rolled-back line")

        // Reference: 001 then 003 from scratch.
        let ref = try Harness(editorFolder: h.editorFolder)
        try ref.drop("001.jsonl", try Fixture.batch(0..<2))
        try ref.drop("003.jsonl", try Fixture.batch(4..<6))
        try ref.processor.runOnce()
        XCTAssertEqual(v3.stateSHA256, try ref.headState())

        // A rollback after the batch loaded HEAD and before its commit (the third stop check: run loop,
        // after parsing, after loading HEAD).
        var checks = 0
        h.processor.shouldStop = {
            checks += 1
            if checks == 3 { try! CheckpointStore(at: h.storeURL).rollback(to: .number(1)) }
            return false
        }
        try h.drop("004.jsonl", try Fixture.batch(6..<8))
        let out = try h.processor.runOnce()
        XCTAssertEqual(out.map(\.status), [.committed])
        let v4 = try h.store.manifest(try h.store.head()!)
        XCTAssertEqual(v4.parent, 1, "applied again on the rolled-back HEAD")
        let ref2 = try Harness(editorFolder: h.editorFolder)
        try ref2.drop("001.jsonl", try Fixture.batch(0..<2))
        try ref2.drop("004.jsonl", try Fixture.batch(6..<8))
        try ref2.processor.runOnce()
        XCTAssertEqual(v4.stateSHA256, try ref2.headState())
        XCTAssertGreaterThan(checks, 3)
    }

    /// A crash after the commit leaves the batch in processing/: the restart finishes it (evaluation file,
    /// history, journal, done/) from what the version holds, without applying it again. A claimed batch
    /// that was never committed is processed from HEAD.
    func testRestartRecoversClaimedBatches() throws {
        let h = try Harness()
        try h.drop("001.jsonl", try Fixture.batch(0..<2))
        try h.drop("002.jsonl", try Fixture.batch(2..<4))
        try h.processor.runOnce()
        // Undo the steps after 002's commit, as a crash right after the commit would have left things.
        let eval2 = h.processor.evaluationsFolder.appendingPathComponent("002.v0002.json")
        let kept = try Data(contentsOf: eval2)
        try FileManager.default.removeItem(at: eval2)
        try FileManager.default.moveItem(at: h.inboxURL.appendingPathComponent("done/002.jsonl"),
                                         to: h.inboxURL.appendingPathComponent("processing/002.jsonl"))
        let history = try h.store.lines(of: .batches)
        let batchLog = h.store.evaluationsFolder.appendingPathComponent(EvaluationLog.batches.rawValue)
        try (history.dropLast().map { $0 + Data("\n".utf8) }.reduce(Data(), +) + Data("{\"torn".utf8)).write(to: batchLog)
        // And a claimed batch that never got to its commit.
        try Fixture.batch(4..<6).write(to: h.inboxURL.appendingPathComponent("processing/003.jsonl"))

        let restarted = try BatchProcessor(inbox: h.inbox, store: h.store, editor: h.editor, resources: h.processor.resources,
                                           settings: h.processor.settings, logger: h.processor.logger)
        let out = try restarted.runOnce()
        XCTAssertEqual(out.map(\.status), [.recovered, .committed])
        XCTAssertEqual(out.map(\.version), [2, 3])
        XCTAssertEqual(try h.store.versions(), [1, 2, 3])
        XCTAssertEqual(try h.store.manifest(3).parent, 2)
        XCTAssertEqual(h.names("done"), ["001.jsonl", "002.jsonl", "003.jsonl"])
        XCTAssertEqual(h.names("processing"), [])
        let rewritten = try PipelineJSON.decoder.decode(BatchReport.self, from: Data(contentsOf: eval2))
        let original = try PipelineJSON.decoder.decode(BatchReport.self, from: kept)
        XCTAssertEqual(rewritten.version, 2)
        XCTAssertEqual(rewritten.reliability, original.reliability)
        XCTAssertEqual(rewritten.stateSHA256, original.stateSHA256)
        let lines = try HistoryReport.load(store: h.storeURL)
        XCTAssertEqual(lines.map(\.batch), ["001.jsonl", "002.jsonl", "003.jsonl"], "the torn line is cut, 002's line is written once")
    }

    /// SIGTERM/SIGINT before the commit abandons the batch: it stays in processing/, nothing is committed,
    /// and the next start processes it first.
    func testStopBeforeCommitAbandonsCleanly() throws {
        let h = try Harness()
        try h.drop("001.jsonl", try Fixture.batch(0..<2))
        try h.drop("002.jsonl", try Fixture.batch(2..<4))
        var checks = 0
        h.processor.shouldStop = { checks += 1; return checks >= 3 }
        let out = try h.processor.runOnce()
        XCTAssertEqual(out.map(\.status), [.abandoned])
        XCTAssertEqual(h.names("processing"), ["001.jsonl"])
        XCTAssertNil(try h.store.head())
        XCTAssertEqual(h.inboxNames(), ["002.jsonl"])
        h.processor.shouldStop = { false }
        XCTAssertEqual(try h.processor.runOnce().map(\.batch), ["001.jsonl", "002.jsonl"])
        XCTAssertEqual(try h.store.manifests().map { $0.batch?.name }, ["001.jsonl", "002.jsonl"])
    }

    /// The same batches from the same start give bit-identical states, equal to applying them through the
    /// editor directly.
    func testDeterminism() throws {
        let a = try Harness()
        let b = try Harness(editorFolder: a.editorFolder)
        let batches = [0..<3, 3..<4, 4..<9]
        for (i, r) in batches.enumerated() {
            try a.drop("\(i).jsonl", try Fixture.batch(r))
            try b.drop("\(i).jsonl", try Fixture.batch(r))
        }
        try a.processor.runOnce()
        try b.processor.runOnce()
        XCTAssertEqual(try a.headState(), try b.headState())
        XCTAssertEqual(try a.store.manifests().map(\.stateSHA256), try b.store.manifests().map(\.stateSHA256))
        // Direct: the editor on an empty state, batch by batch.
        let state = a.editor.newState()
        for r in batches { try a.editor.apply(r.map(Fixture.request), to: state) }
        var hasher = StateHasher()
        // HEAD (9 edits, fewer than `keyframeEdits`) stores what the editor cannot rebuild.
        XCTAssertEqual(try a.store.manifest(3).replayEdits, 9)
        let tensors = state.tensors().filter { !state.rebuiltByReplay.contains($0.key) }
        XCTAssertLessThan(tensors.count, state.tensors().count)
        for name in tensors.keys.sorted(by: Manifest.precedes) {
            let t = tensors[name]!
            hasher.add(name: name, shape: t.shape, values: UnsafeRawBufferPointer(start: t.data, count: t.count * 4))
        }
        XCTAssertEqual(hasher.finalize(), try a.headState())
    }

    /// A `least_squares` editor goes through the daemon like any other: with `keyframeEdits` 0 each version
    /// holds the sums, and HEAD's state is the editor's own on the same batches.
    func testLeastSquaresEditorThroughTheStore() throws {
        let tmp = TempDir("ls-editor")
        try Fixture.writeLeastSquaresEditor(to: tmp.path("editor"))
        let a = try Harness(editorFolder: tmp.path("editor"), keyframeEdits: 0)
        try a.drop("0.jsonl", try Fixture.batch(0..<3))
        try a.drop("1.jsonl", try Fixture.batch(3..<5))
        try a.processor.runOnce()
        XCTAssertEqual(a.names("done"), ["0.jsonl", "1.jsonl"])
        let loaded = try a.store.load()
        for m in Fixture.modules {
            XCTAssertNotNil(loaded.tensors["gram." + m], m)
            XCTAssertNotNil(loaded.tensors["cross." + m], m)
        }
        let direct = a.editor.newState()
        try a.editor.apply((0..<3).map(Fixture.request), to: direct)
        try a.editor.apply((3..<5).map(Fixture.request), to: direct)
        for m in Fixture.modules {
            XCTAssertEqual(loaded.tensors["delta_weight." + m]!.array, direct.delta(m).weight!.array, m)
        }
        XCTAssertEqual(try a.store.manifests().map(\.derived), [nil, nil], "keyframeEdits 0: every tensor stored")
        // With versions stored in part allowed, a whole version leaves ΔW out (the solution of the stored
        // sums' system): the load solves it again, bit for bit the daemon's, and installs it.
        let b = try Harness(editorFolder: tmp.path("editor"), keyframeEdits: 1)
        try b.drop("0.jsonl", try Fixture.batch(0..<3))
        try b.drop("1.jsonl", try Fixture.batch(3..<5))
        try b.processor.runOnce()
        let inMemory = try XCTUnwrap(b.processor.committedHead?.state)
        let deltas = Fixture.modules.map { "delta_weight." + $0 }
        XCTAssertEqual(try b.store.manifests().map(\.derived), [deltas.sorted(), deltas.sorted()])
        XCTAssertEqual(try b.store.manifests().map(\.format), [Manifest.derivedFormat, Manifest.derivedFormat])
        let stored = try b.store.load()
        XCTAssertTrue(Set(stored.tensors.keys).isDisjoint(with: deltas))
        let editorSHA = PipelineResources.hashes(modelFolder: Fixture.modelFolder, editorFolder: tmp.path("editor")).editor
        b.folder.model.clearEdits()
        let solved = try VersionReplay.state(of: stored, in: b.store, editor: b.editor, editorSHA256: editorSHA)
        for m in Fixture.modules {
            XCTAssertTrue(solved.delta(m).weight?.array == inMemory.delta(m).weight!.array, "\(m): ΔW solved at load")
            XCTAssertTrue(solved.delta(m).weight?.array == direct.delta(m).weight!.array, "\(m): ΔW of the editor applied directly")
            XCTAssertTrue(b.folder.model.linears[m]!.deltaWeight?.array == direct.delta(m).weight!.array, "\(m): installed")
        }
        // Another editor would solve another ΔW: refused by hash.
        try Fixture.writeLeastSquaresEditor(to: tmp.path("other"), seed: 4)
        let otherSHA = PipelineResources.hashes(modelFolder: Fixture.modelFolder, editorFolder: tmp.path("other")).editor
        XCTAssertThrowsError(try VersionReplay.state(of: stored, in: b.store, editor: b.editor, editorSHA256: otherSHA)) { error in
            guard case PipelineError.replay(2, _) = error else { return XCTFail("\(error)") }
        }
    }

    /// With a routed editor the held-out perplexity after a batch whose keys no held-out line reaches is the
    /// unedited model's, bit for bit (the kept unedited results); once a batch edits a subject a held-out
    /// line names, that line's chunk runs again and the reported perplexity equals HEAD's measured afresh.
    func testRoutedEditorRescoresOnlyTheTextsAKeyReaches() throws {
        let tmp = TempDir("routed-editor")
        try Fixture.writeLeastSquaresEditor(to: tmp.path("editor"), routeThreshold: 0.9)
        let h = try Harness(editorFolder: tmp.path("editor"))
        try h.drop("0.jsonl", try Fixture.batch(0..<1))   // Danielle Darrieux: in no held-out line
        try h.drop("1.jsonl", try Fixture.batch(9..<10))  // Pierre Curie: "Pierre Curie was a physicist."
        let out = try h.processor.runOnce()
        XCTAssertEqual(h.names("done"), ["0.jsonl", "1.jsonl"])
        let reports = try out.map { try PipelineJSON.decoder.decode(BatchReport.self, from: Data(contentsOf: $0.evaluationFile!)) }
        let first = try XCTUnwrap(reports[0].perplexity), second = try XCTUnwrap(reports[1].perplexity)
        XCTAssertEqual(first.after, first.unedited, "no held-out line reaches the first batch's keys")
        XCTAssertEqual(second.before, first.after)
        XCTAssertNotEqual(second.after, second.unedited, "the second batch's subject opens a held-out line")
        _ = try VersionReplay.state(of: try h.store.load(.number(2)), in: h.store, editor: h.editor, editorSHA256: nil)  // installed
        XCTAssertNotNil(h.folder.model.router)
        // The held-out lines in the processor's order (by length), so that the float sums run alike.
        XCTAssertEqual(second.after, h.folder.model.perplexity(h.processor.heldout), accuracy: 1e-9)
        h.folder.model.clearEdits()
    }

    /// A batch that edits a fact edited before replaces the earlier edit: the evaluation names it, HEAD's
    /// state is the editor's own with the earlier edit superseded, and retention samples leave the replaced
    /// edit out (the batch's own prompts before it, the superseded edit after it).
    func testEditingAFactAgainSupersedesTheEarlierEdit() throws {
        let tmp = TempDir("supersede")
        try Fixture.writeLeastSquaresEditor(to: tmp.path("editor"))
        let h = try Harness(editorFolder: tmp.path("editor"))
        let first = (0..<4).map(Fixture.request)
        var again = Fixture.request(1)
        again.targetNew = again.targetNew == "jazz" ? "piano" : "jazz"
        let later = Fixture.request(7)
        try h.drop("0.jsonl", try EditBatch.encode(first))
        try h.drop("1.jsonl", try EditBatch.encode([again]))
        try h.drop("2.jsonl", try EditBatch.encode([later]))
        let out = try h.processor.runOnce()
        XCTAssertEqual(h.names("done"), ["0.jsonl", "1.jsonl", "2.jsonl"])
        let reports = try out.map { try PipelineJSON.decoder.decode(BatchReport.self, from: Data(contentsOf: $0.evaluationFile!)) }
        XCTAssertNil(reports[0].superseded)
        XCTAssertEqual(reports[1].superseded, [SupersededEdit(prompt: first[1].prompt, targetNew: first[1].targetNew)])
        XCTAssertNil(reports[2].superseded)
        XCTAssertEqual(reports[1].retention?.perEdit?.map(\.prompt), [first[0], first[2], first[3]].map(\.prompt),
                       "the edit being replaced is not sampled for retention")
        let sampled = try XCTUnwrap(reports[2].retention?.perEdit)
        XCTAssertEqual(sampled.map(\.prompt), [first[0], first[2], first[3], again].map(\.prompt), "the replaced edit is gone, its successor sampled")
        XCTAssertEqual(sampled.last?.targetNew, again.targetNew)
        // HEAD's state is the editor's own, with the earlier edit superseded.
        let direct = h.editor.newState()
        try h.editor.apply(first, to: direct)
        try h.editor.apply([again], to: direct, superseding: [PriorEdit(first[1], ordinal: 1)])
        try h.editor.apply([later], to: direct)
        let loaded = try VersionReplay.state(of: try h.store.load(), in: h.store, editor: h.editor, editorSHA256: nil).tensors()
        for m in Fixture.modules {
            XCTAssertEqual(loaded["gram." + m]!.array, direct.tensors()["gram." + m]!.array, m)
            XCTAssertEqual(loaded["delta_weight." + m]!.array, direct.tensors()["delta_weight." + m]!.array, m)
        }
    }

    /// With shards (`ls_shard_edits`), a version just after a shard was frozen is stored whole (no sums; the
    /// frozen shards' blobs are shared with the versions before), the others in part; every version loads
    /// as the editor's own state bit for bit, a re-edit of a fact in a frozen shard included, and the walk
    /// of `verify --rebuild` gives the same.
    func testShardedVersionsThroughTheStore() throws {
        let tmp = TempDir("sharded")
        try Fixture.writeLeastSquaresEditor(to: tmp.path("editor"), routeThreshold: 0.9, shardEdits: 3)
        let h = try Harness(editorFolder: tmp.path("editor"), keyframeEdits: 100)
        var again = Fixture.request(1)
        again.targetNew = again.targetNew == "jazz" ? "piano" : "jazz"
        let batches: [[EditRequest]] = [(0..<2).map(Fixture.request), (2..<4).map(Fixture.request), (4..<6).map(Fixture.request),
                                        [again], [Fixture.request(7)]]
        for (i, b) in batches.enumerated() { try h.drop("\(i).jsonl", try EditBatch.encode(b)) }
        try h.processor.runOnce()
        XCTAssertEqual(h.names("done").count, 5)
        XCTAssertEqual(try h.store.manifests().map(\.replayEdits), [2, 4, nil, 1, 2], "version 3 ends shard 2: stored whole")
        let editorSHA = PipelineResources.hashes(modelFolder: Fixture.modelFolder, editorFolder: tmp.path("editor")).editor
        let direct = h.editor.newState()
        var walk: VersionReplay.Rebuilt?
        for (i, b) in batches.enumerated() {
            try h.editor.apply(b, to: direct, superseding: i == 3 ? [PriorEdit(Fixture.request(1), ordinal: 1)] : [])
            let loaded = try h.store.load(.number(i + 1))
            XCTAssertEqual(loaded.tensors.keys.contains { $0.hasPrefix("shard_delta.") }, i == 2, "version \(i + 1)")
            let rebuilt = try VersionReplay.state(of: loaded, in: h.store, editor: h.editor, editorSHA256: editorSHA).tensors()
            let expected = direct.tensors()
            XCTAssertEqual(Set(rebuilt.keys), Set(expected.keys), "version \(i + 1)")
            for (name, t) in expected { XCTAssertEqual(rebuilt[name]?.array, t.array, "version \(i + 1): \(name)") }
            if let w = walk, loaded.manifest.replayEdits != nil {
                walk = try VersionReplay.continuing(w, to: loaded, in: h.store, editor: h.editor, editorSHA256: editorSHA)
            } else {
                walk = try VersionReplay.rebuilt(loaded, in: h.store, editor: h.editor, editorSHA256: editorSHA)
            }
            let walked = try XCTUnwrap(walk).state.tensors()
            for (name, t) in expected { XCTAssertEqual(walked[name]?.array, t.array, "walk, version \(i + 1): \(name)") }
        }
        let state = try XCTUnwrap(direct as? EditState)
        XCTAssertEqual(state.shardEdits, [3, 3])
        XCTAssertEqual(Array(state.router!.keyThresholds[3..<6]), [2, 2, 2], "the re-edited fact's earlier keys are retired")
    }

    /// Between whole versions (at most `keyframeEdits` edits apart) a version stores only what the editor
    /// cannot rebuild; loading it replays the batches since the last whole version (a re-edit among them)
    /// and gives the editor's own state bit for bit; another editor is refused; gc and archives keep what a
    /// version is rebuilt from.
    func testVersionsBetweenWholeOnesAreRebuiltByReplay() throws {
        let tmp = TempDir("replay")
        try Fixture.writeLeastSquaresEditor(to: tmp.path("editor"), routeThreshold: 0.9)
        let h = try Harness(editorFolder: tmp.path("editor"), keyframeEdits: 4)
        var again = Fixture.request(1)
        again.targetNew = again.targetNew == "jazz" ? "piano" : "jazz"
        let batches: [[EditRequest]] = [(0..<2).map(Fixture.request), [Fixture.request(2), again], [Fixture.request(4)],
                                        (5..<8).map(Fixture.request), [Fixture.request(8)]]
        for (i, b) in batches.enumerated() { try h.drop("\(i).jsonl", try EditBatch.encode(b)) }
        try h.processor.runOnce()
        XCTAssertEqual(h.names("done").count, 5)
        XCTAssertEqual(try h.store.manifests().map(\.replayEdits), [2, 4, nil, 3, 4])
        XCTAssertEqual(try h.store.manifests().map(\.format), [Manifest.replayFormat, Manifest.replayFormat, Manifest.derivedFormat,
                                                              Manifest.replayFormat, Manifest.replayFormat])
        let direct = h.editor.newState()
        let editorSHA = PipelineResources.hashes(modelFolder: Fixture.modelFolder, editorFolder: tmp.path("editor")).editor
        var wholeStates: [[String: Tensor]] = []
        for (i, b) in batches.enumerated() {
            try h.editor.apply(b, to: direct, superseding: i == 1 ? [PriorEdit(Fixture.request(1), ordinal: 1)] : [])
            let loaded = try h.store.load(.number(i + 1))
            let names = Set(loaded.tensors.keys)
            XCTAssertEqual(names.contains("gram." + Fixture.modules[0]), i == 2, "only version 3 stores the sums")
            XCTAssertFalse(names.contains("delta_weight." + Fixture.modules[0]), "ΔW is solved at load, never stored")
            XCTAssertTrue(names.contains("route.keys"))
            let rebuilt = try VersionReplay.state(of: loaded, in: h.store, editor: h.editor, editorSHA256: editorSHA).tensors()
            let expected = direct.tensors()
            XCTAssertEqual(Set(rebuilt.keys), Set(expected.keys), "version \(i + 1)")
            for (name, t) in expected { XCTAssertEqual(rebuilt[name]?.array, t.array, "version \(i + 1): \(name)") }
            wholeStates.append(rebuilt)
        }
        // A walk over the versions in order, each one stored in part continuing its parent's rebuilt state with
        // its batch (`checkpoints verify --rebuild`), gives every version's state bit for bit.
        // A step that does not finish (`finish: false`, what the walk uses) leaves ΔW stale and nothing else.
        var walk: VersionReplay.Rebuilt?
        for v in 1...5 {
            let loaded = try h.store.load(.number(v))
            var finished = true
            if let w = walk, loaded.manifest.replayEdits != nil {
                finished = v != 4
                walk = try VersionReplay.continuing(w, to: loaded, in: h.store, editor: h.editor, editorSHA256: editorSHA, finish: finished)
            } else {
                walk = try VersionReplay.rebuilt(loaded, in: h.store, editor: h.editor, editorSHA256: editorSHA)
            }
            let rebuilt = try XCTUnwrap(walk).state
            let state = rebuilt.tensors()
            XCTAssertEqual(Set(state.keys), Set(wholeStates[v - 1].keys), "version \(v)")
            for (name, t) in wholeStates[v - 1] where finished || !rebuilt.rebuiltByReplay.contains(name) || !name.hasPrefix("delta_weight.") {
                XCTAssertTrue(state[name]?.array == t.array, "walk, version \(v): \(name)")
            }
        }
        // Only a version whose parent the walk holds continues it.
        let atTwo = try VersionReplay.rebuilt(try h.store.load(.number(2)), in: h.store, editor: h.editor, editorSHA256: editorSHA)
        XCTAssertThrowsError(try VersionReplay.continuing(atTwo, to: try h.store.load(.number(5)), in: h.store, editor: h.editor,
                                                          editorSHA256: editorSHA)) { error in
            guard case PipelineError.replay(5, _) = error else { return XCTFail("\(error)") }
        }
        // Whole version 3 against version 4, stored in part: as stored, the sums only version 3 holds show
        // as removed; rebuilt (`checkpoints diff --rebuild`), every tensor is in both.
        let gram = "gram." + Fixture.modules[0]
        let stored: [TensorDifference] = CheckpointStore.diff(try h.store.load(.number(3)).tensors, try h.store.load(.number(4)).tensors)
        XCTAssertEqual(stored.first { $0.name == gram }?.status, TensorDifference.Status.removed)
        let whole: [TensorDifference] = CheckpointStore.diff(wholeStates[2], wholeStates[3])
        let unmatched: [String] = whole.filter { [.removed, .added].contains($0.status) }.map(\.name)
        XCTAssertEqual(unmatched, [])
        XCTAssertEqual(whole.first { $0.name == gram }?.status, TensorDifference.Status.changed)
        XCTAssertNotNil(h.folder.model.router, "the rebuilt state is installed")
        // Another editor cannot rebuild it: refused by hash, and by the check when no hash is known.
        try Fixture.writeLeastSquaresEditor(to: tmp.path("other"), seed: 4, routeThreshold: 0.9)
        let other = try EditorRegistry.load(from: tmp.path("other"), model: h.folder.model, tokenizer: h.folder.tokenizer!)
        let otherSHA = PipelineResources.hashes(modelFolder: Fixture.modelFolder, editorFolder: tmp.path("other")).editor
        for sha in [otherSHA, nil] {
            XCTAssertThrowsError(try VersionReplay.state(of: try h.store.load(.number(5)), in: h.store, editor: other, editorSHA256: sha)) { error in
                guard case PipelineError.replay(5, _) = error else { return XCTFail("\(error)") }
            }
        }
        let atFive = direct.tensors()
        // A new processor on this store (HEAD rebuilt by replay) continues as one that kept HEAD in memory.
        let extra = [Fixture.request(9)]
        let ref = try Harness(editorFolder: tmp.path("editor"), keyframeEdits: 4)
        for (i, b) in (batches + [extra]).enumerated() { try ref.drop("\(i).jsonl", try EditBatch.encode(b)) }
        try ref.processor.runOnce()
        let reopened = try BatchProcessor(inbox: h.inbox, store: h.store, editor: h.editor, resources: h.processor.resources,
                                          settings: h.processor.settings,
                                          logger: Logger(label: "test.replay") { StructuredLogHandler(label: $0, level: .critical) })
        try h.drop("5.jsonl", try EditBatch.encode(extra))
        try reopened.runOnce()
        XCTAssertEqual(try h.store.manifest(6).replayEdits, nil, "5 edits since version 3: whole again")
        XCTAssertEqual(try h.headState(), try ref.headState())
        // gc --keep 1 with HEAD at 5 keeps 5, the newest (6) and what 5 is rebuilt from (3, 4).
        try h.store.rollback(to: .number(5))
        XCTAssertEqual(try h.store.gc(keep: 1).keptVersions, [3, 4, 5, 6])
        // An archive of version 5 carries them; restored elsewhere it rebuilds the same state.
        let archive = tmp.path("v5.tar.zst")
        try CheckpointArchive.create(store: h.store, version: .head, to: archive)
        let target = try CheckpointStore(at: tmp.path("restored"), create: true)
        try CheckpointArchive.restore(from: archive, into: target)
        let restored = try VersionReplay.state(of: try target.load(), in: target, editor: h.editor, editorSHA256: editorSHA).tensors()
        XCTAssertEqual(Set(restored.keys), Set(atFive.keys))
        for (name, t) in atFive { XCTAssertEqual(restored[name]?.array, t.array, name) }
    }

    /// OpenBLAS sums some products differently at one and at two threads (the fixture's logits backward,
    /// vocabulary 1,000, differs in its last bits), so a batch replayed at another thread count than it was
    /// applied with would not rebuild. Each version records its batch's count and the replay runs each batch
    /// at it: three batches at 2 / 1 / 2 threads rebuild, at either count, to the state applied directly.
    func testReplayUsesEachBatchsBLASThreadCount() throws {
        let tmp = TempDir("replay-threads")
        try Fixture.writeLeastSquaresEditor(to: tmp.path("editor"), routeThreshold: 0.9)
        let h = try Harness(editorFolder: tmp.path("editor"), keyframeEdits: 100)
        let batches: [[EditRequest]] = [(0..<3).map(Fixture.request), (3..<5).map(Fixture.request), (5..<8).map(Fixture.request)]
        let counts = [2, 1, 2]
        let threadsBefore = BLAS.threads
        let direct = h.editor.newState()
        var expected: [[String: Tensor]] = []
        for (i, b) in batches.enumerated() {
            try h.drop("\(i).jsonl", try EditBatch.encode(b))
            try BLAS.withThreads(counts[i]) { _ = try h.processor.runOnce() }
            try BLAS.withThreads(counts[i]) { _ = try h.editor.apply(b, to: direct) }
            expected.append(direct.tensors().mapValues { $0.copy() })  // the state updates its sums in place
        }
        XCTAssertEqual(try h.store.manifests().map(\.blasThreads), counts)
        XCTAssertEqual(try h.store.manifests().map(\.replayEdits), [3, 5, 8], "every version stored in part")
        let editorSHA = PipelineResources.hashes(modelFolder: Fixture.modelFolder, editorFolder: tmp.path("editor")).editor
        for threads in [1, 2] {
            for v in 1...3 {
                let rebuilt = try BLAS.withThreads(threads) {
                    try VersionReplay.state(of: try h.store.load(.number(v)), in: h.store, editor: h.editor, editorSHA256: editorSHA).tensors()
                }
                XCTAssertEqual(Set(rebuilt.keys), Set(expected[v - 1].keys), "version \(v) at \(threads) threads")
                for (name, t) in expected[v - 1] {
                    XCTAssertTrue(rebuilt[name]?.array == t.array, "version \(v) rebuilt at \(threads) threads: \(name) differs")
                }
            }
        }
        XCTAssertEqual(BLAS.threads, threadsBefore, "the thread count comes back")
    }

    /// A training-free AlphaEdit editor goes through the daemon through the registry: versions hold its own
    /// state (ΔW and the earlier edits' keys), HEAD equals the editor applied directly, a rollback and the
    /// same batch again give the same state, and the version exports.
    func testAlphaEditEditorThroughTheStore() throws {
        let tmp = TempDir("alphaedit-editor")
        try Fixture.writeAlphaEditEditor(to: tmp.path("editor"))
        let a = try Harness(editorFolder: tmp.path("editor"))
        XCTAssertEqual(a.editor.method, .alphaedit)
        try a.drop("0.jsonl", try Fixture.batch(0..<3))
        try a.drop("1.jsonl", try Fixture.batch(3..<5))
        try a.processor.runOnce()
        XCTAssertEqual(a.names("done"), ["0.jsonl", "1.jsonl"])
        let loaded = try a.store.load()
        let m = "transformer.h.1.mlp.c_proj"
        XCTAssertNotNil(loaded.tensors["edit_keys." + m])
        XCTAssertEqual(loaded.tensors["edit_count"]?[0], 5)
        let direct = a.editor.newState()
        try a.editor.apply((0..<3).map(Fixture.request), to: direct)
        try a.editor.apply((3..<5).map(Fixture.request), to: direct)
        XCTAssertEqual(loaded.tensors["delta_weight." + m]!.array, direct.delta(m).weight!.array)
        let head = try a.headState()
        try a.store.rollback(to: .number(1))
        try a.drop("1-again.jsonl", try Fixture.batch(3..<5))
        try a.processor.runOnce()
        XCTAssertEqual(try a.headState(), head)
        let out = tmp.path("exported")
        try EditedModelExport.export(model: a.folder, state: try a.store.load().tensors, to: out)
        XCTAssertTrue(FileManager.default.fileExists(atPath: out.appendingPathComponent("model.safetensors").path))
    }

    /// The collapse guard refuses a batch that crosses a threshold: failed/ with the evaluation as the
    /// reason, HEAD unchanged; the next batch is judged on its own.
    func testCollapseGuardKeepsHead() throws {
        var g = CollapseGuard()
        g.minCanaryLocality = 0; g.maxPerplexityRatio = 1e6; g.minRetention = 0; g.minReliability = 0  // the fixture's editor is untrained
        let h = try Harness(guardSettings: g)
        try h.drop("001.jsonl", try Fixture.batch(0..<2))
        XCTAssertEqual(try h.processor.runOnce().map(\.status), [.committed])
        let state = try h.headState()
        h.processor.settings.collapseGuard.maxPerplexityRatio = 1e-3  // any batch now "collapses" the model
        try h.drop("002.jsonl", try Fixture.batch(2..<4))
        let out = try h.processor.runOnce()
        XCTAssertEqual(out.map(\.status), [.guarded])
        XCTAssertEqual(try h.store.versions(), [1])
        XCTAssertEqual(try h.headState(), state)
        let e = try PipelineJSON.decoder.decode(BatchErrorFile.self, from: Data(contentsOf: h.inboxURL.appendingPathComponent("failed/002.jsonl.error.json")))
        XCTAssertEqual(e.stage, .guard)
        XCTAssertEqual(e.head, 1)
        XCTAssertTrue(e.reason.contains("perplexity"), e.reason)
        let ev = try XCTUnwrap(e.evaluation)
        XCTAssertEqual(ev.status, .guarded)
        XCTAssertFalse(ev.guardResult.passed)
        XCTAssertEqual(ev.perEdit.count, 2)
        XCTAssertNotNil(ev.retention, "retention on the earlier batch's edits")
        // Canary floor.
        h.processor.settings.collapseGuard.maxPerplexityRatio = 1e6
        h.processor.settings.collapseGuard.minCanaryLocality = 1.01
        try h.drop("003.jsonl", try Fixture.batch(4..<5))
        XCTAssertEqual(try h.processor.runOnce().map(\.status), [.guarded])
        // Retention floor.
        h.processor.settings.collapseGuard.minCanaryLocality = 0
        h.processor.settings.collapseGuard.minRetention = 1.01
        try h.drop("004.jsonl", try Fixture.batch(5..<6))
        XCTAssertEqual(try h.processor.runOnce().map(\.status), [.guarded])
        XCTAssertEqual(try h.store.versions(), [1])
        // Reliability floor: the batch's own edits must take.
        h.processor.settings.collapseGuard.minRetention = 0
        h.processor.settings.collapseGuard.minReliability = 1.01
        try h.drop("005.jsonl", try Fixture.batch(6..<7))
        let refused = try h.processor.runOnce()
        XCTAssertEqual(refused.map(\.status), [.guarded])
        XCTAssertTrue(refused[0].note!.contains("reliability"), refused[0].note!)
        XCTAssertEqual(try h.store.versions(), [1])
        // Off: the same batch commits, the would-be violations noted.
        h.processor.settings.collapseGuard.enabled = false
        try FileManager.default.moveItem(at: h.inboxURL.appendingPathComponent("failed/004.jsonl"), to: h.inboxURL.appendingPathComponent("004.jsonl"))
        let last = try h.processor.runOnce()
        XCTAssertEqual(last.map(\.status), [.committed])
        XCTAssertTrue(last[0].report!.guardResult.notes.contains { $0.contains("would refuse") })
    }

    /// The watch list: each fact scored before and after every batch, in the evaluation file, the batch
    /// log and the report.
    func testWatchListIsScoredAfterEveryBatch() throws {
        let h = try Harness()
        var resources = h.processor.resources
        let mine = Fixture.request(0)
        resources.watchList = [mine, EditRequest(prompt: "The capital of France is", targetNew: "Paris")]
        let p = try BatchProcessor(inbox: h.inbox, store: h.store, editor: h.editor, resources: resources,
                                   settings: h.processor.settings, logger: h.processor.logger)
        try h.drop("001.jsonl", try Fixture.batch(0..<1))
        try h.drop("002.jsonl", try Fixture.batch(1..<2))
        let out = try p.runOnce()
        XCTAssertEqual(out.map(\.status), [.committed, .committed])
        let first = try XCTUnwrap(out[0].report?.watchList)
        XCTAssertEqual(first.map(\.prompt), [mine.prompt, "The capital of France is"])
        XCTAssertEqual(first[0].after, out[0].report!.perEdit[0].reliability, "the batch's own edit, scored the same way")
        let second = try XCTUnwrap(out[1].report?.watchList)
        XCTAssertEqual(second[0].before, first[0].after, accuracy: 1e-12, "before the next batch = after the last")
        let lines = try HistoryReport.load(h.store)
        XCTAssertEqual(lines.map { $0.watch?.count }, [2, 2])
        let html = HistoryReport.html(lines)
        XCTAssertTrue(html.contains("Watch list across versions"))
        XCTAssertEqual(html.components(separatedBy: "<tr><td>").count - 1 - lines.count, 2, "one row per watched fact")
    }

    /// The report marks HEAD, lists rollbacks and failed batches with their reasons, links each batch
    /// to its evaluation file, and shows the batches of a store restored from an archive.
    func testReportMarksHeadFailuresAndRestoredBatches() throws {
        let h = try Harness()
        h.processor.settings.unfinishedTimeout = 0
        try h.drop("001.jsonl", try Fixture.batch(0..<1))
        try h.drop("002.jsonl", try Fixture.batch(1..<2))
        try h.drop("003-bad.jsonl", Data("{\"prompt\": \"x\"}\n".utf8))
        try h.processor.runOnce()
        try h.store.rollback(to: .number(1))
        let html = HistoryReport.html(try HistoryReport.load(h.store), context: try HistoryReport.Context.of(h.store))
        XCTAssertTrue(html.contains("HEAD: version 1"))
        XCTAssertEqual(html.components(separatedBy: "(HEAD)").count - 1, 1)
        XCTAssertTrue(html.contains("<tr class=\"head\"><td>") && html.contains("<a href=\"001.v0001.html\">001.jsonl</a> <a class=\"json\" href=\"001.v0001.json\">json</a>"))
        XCTAssertTrue(html.contains("Failed batches") && html.contains("003-bad.jsonl") && html.contains("required but missing"))
        XCTAssertTrue(html.contains("Moves of HEAD besides commits") && html.contains("<td>rollback</td><td>2</td><td>1</td>"))

        let archive = h.tmp.path("v2.tar.zst")
        try CheckpointArchive.create(store: h.store, version: .number(2), to: archive)
        let restored = try CheckpointStore(at: h.tmp.path("restored"), create: true)
        try CheckpointArchive.restore(from: archive, into: restored)
        XCTAssertEqual(try HistoryReport.load(restored).map(\.batch), ["001.jsonl", "002.jsonl"], "from the versions' own evaluation files")
    }

    /// The report's y-axis labels name the value at their height (they read 0.2/0.5/0.8 at 0.25/0.5/0.75).
    func testReportTicksAreExact() {
        let (unit, d1) = HistoryReport.niceTicks(0, 1)
        XCTAssertEqual(unit.map { String(format: "%.\(d1)f", $0) }, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"])
        let (ppl, d0) = HistoryReport.niceTicks(150, 230)
        XCTAssertEqual(ppl, [160, 180, 200, 220]); XCTAssertEqual(d0, 0)
        let (small, d3) = HistoryReport.niceTicks(0.98, 1.02)
        XCTAssertEqual(small.map { String(format: "%.\(d3)f", $0) }, ["0.98", "0.99", "1.00", "1.01", "1.02"])
        // In the page: each label's height is its value's.
        let svg = HistoryReport.chart(labels: ["v1", "v2"], series: [.init(name: "r", color: "#000", values: [0.3, 0.9])], yRange: (0, 1))
        let ticks = svg.components(separatedBy: "class=\"ytick\"").dropFirst().map { part -> (Double, Double) in
            let y = Double(part.components(separatedBy: "y=\"")[1].prefix { $0 != "\"" })!
            let label = Double(part.components(separatedBy: ">")[1].prefix { $0 != "<" })!
            return (y - 4, label)
        }
        XCTAssertEqual(ticks.count, 6)
        for (y, v) in ticks { XCTAssertEqual(y, 15 + 250 * (1 - v), accuracy: 0.06, "label \(v)") }
    }

    /// Greedy answers stop at end-of-text: `Polish` + EOS + `The` is reported as `Polish`.
    func testAnswersStopAtEndOfText() {
        XCTAssertEqual(EditMetrics.answerTokens([5, 6, 7, 50256, 8], promptCount: 2, eos: 50256), [7])
        XCTAssertEqual(EditMetrics.answerTokens([5, 6, 50256, 8], promptCount: 2, eos: 50256), [])
        XCTAssertEqual(EditMetrics.answerTokens([5, 6, 7, 50256, 8], promptCount: 2, eos: nil), [7, 50256, 8])
    }

    /// ROME's n-gram entropy: mean(2/3·H₂, 4/3·H₃) over word tokens, punctuation split off.
    func testNGramEntropy() {
        // a b a b a b: bigrams ab ×3, ba ×2 → H₂ = H(0.6, 0.4); trigrams aba ×2, bab ×2 → H₃ = 1.
        let h2: Double = -(0.6 * log2(0.6) + 0.4 * log2(0.4))
        let expected: Double = (2.0 / 3 * h2 + 4.0 / 3) / 2
        XCTAssertEqual(EditMetrics.ngramEntropy("a b a b a b"), expected, accuracy: 1e-12)
        // Five distinct words: H₂ = log2 4, H₃ = log2 3.
        let h3: Double = log2(3)
        XCTAssertEqual(EditMetrics.ngramEntropy("one two three four five"), (2.0 / 3 * 2 + 4.0 / 3 * h3) / 2, accuracy: 1e-12)
        // "Polish.The" is three tokens: two bigrams, one trigram.
        XCTAssertEqual(EditMetrics.ngramEntropy("Polish.The"), 1.0 / 3, accuracy: 1e-12)
        XCTAssertEqual(EditMetrics.ngramEntropy("word"), 0)
        XCTAssertLessThan(EditMetrics.ngramEntropy("the the the the the the the the"), EditMetrics.ngramEntropy("the cat sat on the mat by the door"))
        // The same bits in every process: the terms are summed in the counts' sorted order, not in a dictionary's
        // order (which Swift's per-process hash seed changes). Bigrams of this text: counts 1…24 for 24 pairs.
        var words: [String] = []
        for k in 1...24 { for _ in 0..<k { words.append("w\(k) v\(k)") } }
        let text = words.joined(separator: " ")
        var bigrams: [String: Int] = [:], trigrams: [String: Int] = [:]
        let tokens = text.split(separator: " ").map(String.init)
        for i in 0..<(tokens.count - 1) { bigrams[tokens[i] + " " + tokens[i + 1], default: 0] += 1 }
        for i in 0..<(tokens.count - 2) { trigrams[tokens[i...(i + 2)].joined(separator: " "), default: 0] += 1 }
        func sortedEntropy(_ counts: [String: Int], total: Int) -> Double {
            counts.values.sorted().reduce(0.0) { h, c in let p = Double(c) / Double(total); return h - p * log2(p) }
        }
        let exact = (2.0 / 3.0 * sortedEntropy(bigrams, total: tokens.count - 1) + 4.0 / 3.0 * sortedEntropy(trigrams, total: tokens.count - 2)) / 2
        XCTAssertEqual(EditMetrics.ngramEntropy(text).bitPattern, exact.bitPattern)
        XCTAssertEqual(EditMetrics.fluencyIndices(count: 3, sample: 8), [0, 1, 2])
        XCTAssertEqual(EditMetrics.fluencyIndices(count: 10, sample: 4), [0, 2, 5, 7])
        XCTAssertEqual(EditMetrics.fluencyIndices(count: 10, sample: 0), [])
    }

    /// The evaluation file, the version's files, history.jsonl and the HTML report.
    func testEvaluationFilesHistoryAndReport() throws {
        let h = try Harness()
        try h.drop("0001-first.jsonl", try Fixture.batch(0..<3))
        try h.drop("0002-second.jsonl", try Fixture.batch(3..<5))
        let out = try h.processor.runOnce()
        XCTAssertEqual(out.map(\.status), [.committed, .committed])
        let url = h.processor.evaluationsFolder.appendingPathComponent("0002-second.v0002.json")
        XCTAssertEqual(out[1].evaluationFile?.standardizedFileURL, url.standardizedFileURL)
        XCTAssertEqual(try Data(contentsOf: url), try Data(contentsOf: h.store.evaluationsDirectory(for: 2).appendingPathComponent("0002-second.v0002.json")))
        let r = try PipelineJSON.decoder.decode(BatchReport.self, from: Data(contentsOf: url))
        XCTAssertEqual(r.format, BatchReport.currentFormat)
        XCTAssertEqual(r.version, 2); XCTAssertEqual(r.parent, 1)
        XCTAssertEqual(r.edits, 2); XCTAssertEqual(r.totalEdits, 5)
        XCTAssertEqual(r.perEdit.count, 2)
        XCTAssertNotNil(r.perEdit[0].answerBefore); XCTAssertNotNil(r.perEdit[0].answerAfter)
        XCTAssertNotNil(r.perEdit[0].generality); XCTAssertNotNil(r.perEdit[0].locality)
        let fluency = try XCTUnwrap(r.fluency)
        XCTAssertEqual(fluency.sampled, 2); XCTAssertEqual(fluency.tokens, PipelineSettings().fluencyTokens)
        let continuation = try XCTUnwrap(r.perEdit[1].continuationAfter)
        XCTAssertEqual(r.perEdit[1].fluencyAfter!, EditMetrics.ngramEntropy(r.perEdit[1].prompt + continuation), accuracy: 1e-12)
        XCTAssertEqual(fluency.after, (r.perEdit[0].fluencyAfter! + r.perEdit[1].fluencyAfter!) / 2, accuracy: 1e-12)
        // Answers and continuations come from one decode: each equals its prompt's own decode, with version 2's
        // edits (installed) and without them.
        let model = h.editor.model, tok = h.editor.tokenizer, settings = h.processor.settings
        for e in r.perEdit {
            XCTAssertEqual(e.answerAfter, try EditMetrics.greedyAnswer(model, tok, prompt: e.prompt, maxTokens: settings.answerTokens))
            XCTAssertEqual(e.answerBefore, try model.withoutEdits { try EditMetrics.greedyAnswer(model, tok, prompt: e.prompt, maxTokens: settings.answerTokens) })
            let alone = try EditMetrics.greedyContinuationsEditedAndUnedited(model, tok, prompts: [e.prompt], tokens: settings.fluencyTokens)
            XCTAssertEqual(e.continuationAfter, alone.edited[0])
            XCTAssertEqual(e.fluencyAfter, EditMetrics.ngramEntropy(e.prompt + alone.edited[0]))
            XCTAssertEqual(e.fluencyBefore, EditMetrics.ngramEntropy(e.prompt + alone.unedited[0]))
        }
        XCTAssertEqual(r.retention?.earlierEdits, 3)
        XCTAssertEqual(r.retention?.sampled, 3)
        let kept = try XCTUnwrap(r.retention?.perEdit)
        XCTAssertEqual(kept.map(\.prompt), (0..<3).map { Fixture.request($0).prompt }, "per sampled earlier edit")
        XCTAssertEqual(kept.map(\.after).reduce(0, +) / 3, r.retention!.after, accuracy: 1e-12)
        XCTAssertEqual(r.canary.probes, 3)
        XCTAssertNotNil(r.canary.locality)
        let p = try XCTUnwrap(r.perplexity)
        let first = try PipelineJSON.decoder.decode(BatchReport.self, from: Data(contentsOf: out[0].evaluationFile!))
        XCTAssertEqual(first.perplexity?.before, first.perplexity?.unedited, "the first batch starts from the unedited model")
        XCTAssertEqual(p.before, first.perplexity!.after, accuracy: 1e-9, "before = HEAD's perplexity")
        // The cached "before" (HEAD's own evaluation) equals HEAD's perplexity measured afresh.
        _ = try VersionReplay.state(of: try h.store.load(.number(1)), in: h.store, editor: h.editor, editorSHA256: nil)  // installed
        let texts = h.processor.resources.heldoutText.enumerated().sorted { ($0.element.count, $0.offset) < ($1.element.count, $1.offset) }.map(\.element)
        XCTAssertEqual(p.before, h.folder.model.perplexity(texts), accuracy: 1e-9)
        h.folder.model.clearEdits()
        XCTAssertNil(first.retention)
        XCTAssertGreaterThan(r.timings.signal, 0); XCTAssertGreaterThan(r.timings.commit, 0); XCTAssertGreaterThan(r.timings.evaluate, 0)
        let m = try h.store.manifest(2)
        XCTAssertEqual(m.batch?.name, "0002-second.jsonl")
        XCTAssertEqual(m.batch?.sha256, try FileHash.sha256(ofFileAt: h.inboxURL.appendingPathComponent("done/0002-second.jsonl")))
        XCTAssertEqual(r.sha256, m.batch?.sha256)
        XCTAssertEqual(r.stateSHA256, m.stateSHA256)
        XCTAssertEqual(Set(m.files.map(\.name)), ["edit_log.000000.jsonl", "evaluation.json"])
        // The edit log is itself a batch of all applied edits.
        let log = try EditBatch.parse(try h.store.fileData("edit_log.000000.jsonl", in: .number(2)), file: "log")
        XCTAssertEqual(log, (0..<5).map(Fixture.request))
        let lines = try HistoryReport.load(store: h.storeURL)
        XCTAssertEqual(lines.map(\.version), [1, 2])
        XCTAssertEqual(lines[1].evaluation, "0002-second.v0002.json")
        let html = HistoryReport.html(lines)
        XCTAssertTrue(html.hasPrefix("<!DOCTYPE html>"))
        XCTAssertEqual(html.components(separatedBy: "<svg").count - 1, 2, "metrics and perplexity charts")
        XCTAssertTrue(html.contains("0002-second.jsonl"))
        XCTAssertFalse(html.contains("<script"))
        // A page per committed batch, linked from the table, with each edit's answers before and after.
        XCTAssertTrue(html.contains("href=\"0002-second.v0002.html\""), "the table links the batch's page")
        let pages = try HistoryReport.writeBatchPages(h.store, lines: lines)
        XCTAssertEqual(pages, ["0001-first.v0001.html", "0002-second.v0002.html"])
        let page = try String(contentsOf: h.processor.evaluationsFolder.appendingPathComponent(pages[1]), encoding: .utf8)
        XCTAssertTrue(page.hasPrefix("<!DOCTYPE html>")); XCTAssertFalse(page.contains("<script"))
        XCTAssertEqual(page.components(separatedBy: "<tr><td>").count - 1, 1 + 2, "the means and one row per edit")
        XCTAssertEqual(page.components(separatedBy: "<tr><td class=\"text\">").count - 1, r.retention?.perEdit?.count ?? 0, "a row per retained edit")
        XCTAssertTrue(page.contains(HistoryReport.escape(r.perEdit[0].prompt)))
        XCTAssertTrue(page.contains(HistoryReport.escape(r.perEdit[0].answerAfter!)))
        XCTAssertTrue(page.contains("href=\"0002-second.v0002.json\""))
        XCTAssertEqual(try HistoryReport.writeBatchPages(h.store, lines: lines), [], "pages already there are kept")
    }

    /// A file must have been left alone for the minimum age, and the order is strict: a young first file
    /// holds back older ones behind it.
    func testMinimumFileAge() throws {
        let h = try Harness()
        h.processor.settings.minimumFileAge = 30
        try h.drop("a.jsonl", try Fixture.batch(0..<1))
        try h.drop("b.jsonl", try Fixture.batch(1..<2))
        let old = Date().addingTimeInterval(-60)
        try FileManager.default.setAttributes([.modificationDate: old], ofItemAtPath: h.inboxURL.appendingPathComponent("b.jsonl").path)
        guard case .wait(let s) = try h.processor.next() else { return XCTFail("a young first batch must be waited for") }
        XCTAssertGreaterThan(s, 25)
        try FileManager.default.setAttributes([.modificationDate: old], ofItemAtPath: h.inboxURL.appendingPathComponent("a.jsonl").path)
        XCTAssertEqual(try h.processor.next(), .batch("a.jsonl"))
    }

    /// Unknown fields are kept and round-trip; EasyEdit's ZsRE names are aliases.
    func testUnknownFieldsRoundTripAndAliases() throws {
        let text = """
        {"prompt":"Lyon is in","target_new":"Spain","occurrences":120,"split":"heldout","meta":{"a":[1,2.5,"x",null,true]},"case_id":17}
        {"src":"Who wrote Hamlet?","alt":"Marlowe","rephrase":"Hamlet was written by","loc":"nq question: capital of France","loc_ans":"Paris"}

        """
        let rs = try EditBatch.parse(Data(text.utf8), file: "t.jsonl", requireFinalNewline: true)
        XCTAssertEqual(rs[0].extra["occurrences"], .int(120))
        XCTAssertEqual(rs[0].extra["split"], .string("heldout"))
        XCTAssertEqual(rs[0].extra["meta"], .object(["a": .array([.int(1), .double(2.5), .string("x"), .null, .bool(true)])]))
        XCTAssertEqual(rs[0].caseId, "17")
        XCTAssertEqual(rs[1].prompt, "Who wrote Hamlet?"); XCTAssertEqual(rs[1].targetNew, "Marlowe")
        XCTAssertEqual(rs[1].rephrases, ["Hamlet was written by"])
        XCTAssertEqual(rs[1].locality, [.init(prompt: "nq question: capital of France", groundTruth: "Paris")])
        XCTAssertTrue(rs[1].extra.isEmpty)
        let again = try EditBatch.parse(try EditBatch.encode(rs), file: "t2.jsonl", requireFinalNewline: true)
        XCTAssertEqual(again, rs)
        let numbered = try EditBatch.parseNumbered(Data(text.utf8), file: "t.jsonl")
        XCTAssertEqual(numbered.map(\.line), [1, 2])
    }

    func testCanariesFromAWorldsFacts() throws {
        let tmp = TempDir()
        let facts = """
        {"prompt":"A is in","ground_truth":"X","locality_prompt":"B is in","locality_ground_truth":"Y","split":"train"}
        {"prompt":"C is in","ground_truth":"X","locality_prompt":"D is in","locality_ground_truth":"Z","split":"heldout"}
        {"prompt":"E is in","ground_truth":"W"}
        {"prompt":"F is in","ground_truth":"V","split":"heldout","locality_prompt":"G is in","locality_ground_truth":"U"}

        """
        let url = tmp.path("facts.jsonl")
        try Data(facts.utf8).write(to: url)
        XCTAssertEqual(try Canaries.load(url, limit: 20), [.init(prompt: "D is in", groundTruth: "Z"), .init(prompt: "E is in", groundTruth: "W"),
                                                           .init(prompt: "G is in", groundTruth: "U")])
        XCTAssertEqual(try Canaries.load(url, limit: 1).count, 1)
        // No canaries: the check is skipped with a note.
        let h = try Harness(canaries: [])
        try h.drop("1.jsonl", try Fixture.batch(0..<1))
        let r = try XCTUnwrap(try h.processor.runOnce().first?.report)
        XCTAssertNil(r.canary.locality)
        XCTAssertEqual(r.canary.skipped, "no canary file")
    }
}
