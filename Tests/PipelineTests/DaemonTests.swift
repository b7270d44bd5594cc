import Editing
import Foundation
import LanguageModel
import Storage
import TensorCore
import XCTest
@testable import Pipeline
#if canImport(Glibc)
import Glibc
#endif

/// The daemon as users run it: the real `dafnet` executable built by SwiftPM beside this test bundle.
final class DaemonTests: XCTestCase {
    static func executable(_ name: String = "dafnet") throws -> URL {
        let dirs = [Bundle.module.bundleURL.deletingLastPathComponent(), Bundle.main.bundleURL,
                    Bundle.main.bundleURL.deletingLastPathComponent()]
        guard let url = dirs.map({ $0.appendingPathComponent(name) }).first(where: { FileManager.default.isExecutableFile(atPath: $0.path) }) else {
            throw XCTSkip("the \(name) executable is not built beside the tests (run `swift build` first, or `swift test`, which builds it)")
        }
        return url
    }

    /// The fuzzing corpora (fuzz/corpus/<harness>, seeds and what campaigns found) replayed through the
    /// harnesses without the fuzzer: every input that once mattered still parses or fails cleanly.
    func testFuzzCorporaReplay() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let corpus = root.appendingPathComponent("fuzz/corpus")
        let dirs = try FileManager.default.contentsOfDirectory(atPath: corpus.path).sorted().map { corpus.appendingPathComponent($0).path }
        XCTAssertEqual(dirs.count, 5, "one corpus per harness")
        let p = Process()
        p.executableURL = try Self.executable("dafnet-fuzz")
        p.arguments = ["replay"] + dirs
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0, text)
        XCTAssertTrue(text.hasPrefix("replayed "), text)
    }

    /// The files a `dafnet watch` run needs, in a temporary folder.
    final class Setup {
        let tmp = TempDir("daemon")
        let editor: URL
        var inbox: URL { tmp.path("inbox") }
        var store: URL { tmp.path("store") }
        let text: URL
        let canaries: URL

        init(editor existing: URL? = nil) throws {
            editor = existing ?? tmp.path("editor")
            if existing == nil { try Fixture.writeEditor(to: editor) }
            text = tmp.path("heldout.txt")
            try Data((Fixture.heldout.joined(separator: "\n") + "\n").utf8).write(to: text)
            canaries = tmp.path("canaries.jsonl")
            try Data(Fixture.canaries.map { "{\"prompt\":\"\($0.prompt)\",\"ground_truth\":\"\($0.groundTruth)\"}\n" }.joined().utf8).write(to: canaries)
            try FileManager.default.createDirectory(at: inbox, withIntermediateDirectories: true)
        }

        func arguments(once: Bool, inbox: URL? = nil, answers: Bool = true) -> [String] {
            ["watch", "--inbox", (inbox ?? self.inbox).path, "--store", store.path, "--model", Fixture.modelFolder.path,
             "--editor", editor.path, "--text", text.path, "--canaries", canaries.path, "--min-age", "0", "--rescan-interval", "1",
             "--no-guard", "--answer-tokens", answers ? "1" : "0", "--retention-sample", "2", "--text-lines", "2", "--log-level", ProcessInfo.processInfo.environment["PIPE_LOG"] ?? "notice", "--quiet"] + (once ? ["--once"] : [])
        }

        /// Starts `dafnet` with output to files in the temporary folder.
        func spawn(_ args: [String], tag: String) throws -> (Process, URL) {
            let p = Process()
            p.executableURL = try DaemonTests.executable()
            p.arguments = args
            let log = tmp.path("\(tag).log")
            _ = FileManager.default.createFile(atPath: log.path, contents: nil)
            let h = try FileHandle(forWritingTo: log)
            p.standardOutput = h
            p.standardError = h
            try p.run()
            return (p, log)
        }

        func names(_ sub: String) -> [String] {
            ((try? FileManager.default.contentsOfDirectory(atPath: inbox.appendingPathComponent(sub).path)) ?? []).sorted()
        }
    }

    /// Batch i: one or two edits.
    static func batches(_ n: Int, mixed: Bool = true) throws -> [(String, Data)] {
        var at = 0
        return try (0..<n).map { i in
            let k = mixed ? 1 + i % 2 : 1
            defer { at += k }
            return (String(format: "%04d.jsonl", i), try Fixture.batch(at..<(at + k)))
        }
    }

    /// The state hash of applying `batches` in order on an empty state (the editor of the folder).
    static func uninterruptedState(editor folder: URL, batches: [Data]) throws -> String {
        try uninterruptedStates(editor: folder, batches: batches).last!
    }

    /// The state hash after each of `batches`, applied in order on an empty state.
    static func uninterruptedStates(editor folder: URL, batches: [Data]) throws -> [String] {
        let f = try ModelFolder.load(Fixture.modelFolder, requireTokenizer: true)
        let editor = try DAFNetEditor.load(from: folder, model: f.model, tokenizer: f.tokenizer!)
        let state = EditState(moduleNames: editor.config.modules)
        var replay: Int?
        return try batches.map { b in
            let requests = try EditBatch.parse(b, file: "b")
            try editor.apply(requests, to: state)
            // What the version stores: the whole state, or what replaying its edits cannot rebuild.
            replay = PipelineSettings().replayEdits(parent: replay, adding: requests.count, rebuildable: true)
            var hasher = StateHasher()
            let tensors = state.tensors().filter { replay == nil || !state.rebuiltByReplay.contains($0.key) }
            for name in tensors.keys.sorted(by: Manifest.precedes) {
                let t = tensors[name]!
                hasher.add(name: name, shape: t.shape, values: UnsafeRawBufferPointer(start: t.data, count: t.count * 4))
            }
            return hasher.finalize()
        }
    }

    static func waitUntil(_ seconds: Double, _ condition: () -> Bool) -> Bool {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            if condition() { return true }
            usleep(20_000)
        }
        return condition()
    }

    /// SIGKILL at random moments over 30 batches, restarting each time: every batch ends in done/ exactly
    /// once, one version per batch, and HEAD's state is bit for bit that of one uninterrupted run.
    func testSIGKILLAtRandomMomentsOver30Batches() throws {
        _ = try Self.executable()
        let s = try Setup()
        let batches = try Self.batches(30, mixed: false)
        for (name, data) in batches { try data.write(to: s.inbox.appendingPathComponent(name)) }

        // The uninterrupted run: the same batches applied in order through the same editor, in process
        // (`testDeterminism` shows the pipeline's state is exactly this).
        let expectedAfter = try Self.uninterruptedStates(editor: s.editor, batches: batches.map(\.1))
        let expected = expectedAfter.last!
        let t0 = Date()

        var rng = RNG(seed: UInt64(ProcessInfo.processInfo.environment["DAFNET_KILL_SEED"] ?? "") ?? 20_241_122)
        var rounds = 0, kills = 0
        while s.names("done").count < batches.count && rounds < 80 {
            rounds += 1
            let before = s.names("done").count
            let (p, _) = try s.spawn(s.arguments(once: false, answers: false), tag: "round\(rounds)")
            // Kill at a random moment once the round has made progress (a batch done), so the number of
            // kills does not depend on how fast this machine processes batches; on a slow machine a
            // round may also be killed before its first batch completes.
            _ = Self.waitUntil(20) { s.names("done").count > before || !p.isRunning }
            usleep(UInt32(0.25 * rng.uniform() * 1e6))
            if p.isRunning {
                kill(p.processIdentifier, SIGKILL)
                kills += 1
            }
            p.waitUntilExit()
        }
        let logs = (1...rounds).map { (try? String(contentsOf: s.tmp.path("round\($0).log"), encoding: .utf8)) ?? "" }.joined()
        let recovered = logs.components(separatedBy: "batch recovered").count - 1
        let undone = logs.components(separatedBy: "unfinished_versions=").dropFirst().filter { !$0.hasPrefix(" ") && !$0.hasPrefix("\n") }.count
        print(String(format: "kill test: %d kills in %d rounds, %d batches done, %d recovered after a kill between commit and done/, %d commits undone after a kill before HEAD moved, %.1f s",
                     kills, rounds, s.names("done").count, recovered, undone, Date().timeIntervalSince(t0)))
        // Finish whatever is left with one clean run.
        let (last, log) = try s.spawn(s.arguments(once: true, answers: false), tag: "final")
        last.waitUntilExit()
        XCTAssertEqual(last.terminationStatus, 0, (try? String(contentsOf: log, encoding: .utf8)) ?? "")
        XCTAssertGreaterThanOrEqual(kills, 5, "the daemon was killed \(kills) times in \(rounds) rounds")

        XCTAssertEqual(s.names("done"), batches.map(\.0), "every batch in done/ exactly once")
        XCTAssertEqual(s.names("failed"), [])
        XCTAssertEqual(s.names("processing"), [])
        let store = try CheckpointStore(at: s.store)
        let manifests = try store.manifests()
        XCTAssertEqual(manifests.count, 30, "one version per batch")
        XCTAssertEqual(manifests.map { $0.batch!.name }, batches.map(\.0))
        XCTAssertEqual(Set(manifests.map { $0.batch!.sha256 }).count, 30)
        XCTAssertEqual(manifests.map(\.parent), [nil] + manifests.dropLast().map(\.version), "each version builds on the one before")
        XCTAssertEqual(try store.manifest(try store.head()!).stateSHA256, expected, "bit-identical to the uninterrupted run")
        if let bad = manifests.indices.first(where: { manifests[$0].stateSHA256 != expectedAfter[$0] }) {
            XCTFail("the first version that differs from the uninterrupted run: \(manifests[bad].version) (batch \(manifests[bad].batch!.name))\n" + logs)
        }
        XCTAssertTrue(try store.verify().isClean)
        let history = try HistoryReport.load(store: s.store)
        XCTAssertEqual(history.map(\.batch), batches.map(\.0), "one history line per batch")
        let evaluations = try FileManager.default.contentsOfDirectory(atPath: s.store.appendingPathComponent("evaluations").path)
        XCTAssertEqual(evaluations.filter { $0.hasSuffix(".json") && $0.contains(".v0") }.count, 30)
        XCTAssertEqual(evaluations.filter { $0.hasPrefix(".tmp-") }, [])
    }

    /// `generate --store S --version V` answers with the version's edits installed: what the evaluation
    /// file recorded as the answer after; `--prompts` answers many at once; exit status 4 when `watch`
    /// left a batch in failed/; another model folder is refused with exit status 2.
    func testGenerateAsksAStoredVersion() throws {
        _ = try Self.executable()
        let s = try Setup()
        try Fixture.batch(0..<2).write(to: s.inbox.appendingPathComponent("001.jsonl"))
        try Data("{\"prompt\": \"x\"}\n".utf8).write(to: s.inbox.appendingPathComponent("002-bad.jsonl"))
        let (w, wLog) = try s.spawn(s.arguments(once: true), tag: "watch")
        w.waitUntilExit()
        XCTAssertEqual(w.terminationStatus, 4, (try? String(contentsOf: wLog, encoding: .utf8)) ?? "")
        let report = try PipelineJSON.decoder.decode(BatchReport.self, from: Data(contentsOf: s.store.appendingPathComponent("evaluations/001.v0001.json")))
        let prompts = s.tmp.path("prompts.jsonl")
        try Data(report.perEdit.map { "{\"prompt\": \"\($0.prompt)\"}\n" }.joined().utf8).write(to: prompts)
        // Version 1 stores what the editor cannot rebuild: asking it needs the editor that made it.
        let generate = ["generate", "--model", Fixture.modelFolder.path, "--store", s.store.path, "--version", "1",
                        "--max-tokens", "1", "--prompts", prompts.path]
        let (n, nLog) = try s.spawn(generate, tag: "no-editor")
        n.waitUntilExit()
        XCTAssertEqual(n.terminationStatus, 2)
        XCTAssertTrue(try String(contentsOf: nLog, encoding: .utf8).contains("rebuilding it needs that editor (--editor)"))
        let (g, gLog) = try s.spawn(generate + ["--editor", s.editor.path], tag: "generate")
        g.waitUntilExit()
        let text = try String(contentsOf: gLog, encoding: .utf8)
        XCTAssertEqual(g.terminationStatus, 0, text)
        let answers = text.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        XCTAssertEqual(answers.map { $0["answer"] as? String }, report.perEdit.map(\.answerAfter), "the evaluation's answers after the edit")
        // A preview on the stored version commits nothing.
        let (e, eLog) = try s.spawn(["edit", "--model", Fixture.modelFolder.path, "--editor", s.editor.path, "--store", s.store.path,
                                     "--text", s.text.path, "--prompt", report.perEdit[0].prompt, "--target", "Lyon"], tag: "edit")
        e.waitUntilExit()
        let eText = try String(contentsOf: eLog, encoding: .utf8)
        XCTAssertEqual(e.terminationStatus, 0, eText)
        XCTAssertTrue(eText.contains("version 1:") && eText.contains("nothing was committed"), eText)
        XCTAssertEqual(try CheckpointStore(at: s.store).versions(), [1])
        let other = s.tmp.path("other-model")
        try FileManager.default.copyItem(at: Fixture.modelFolder, to: other)
        let weights = other.appendingPathComponent("model.safetensors")
        var bytes = try Data(contentsOf: weights)
        bytes[bytes.count - 1] ^= 1
        try bytes.write(to: weights)
        let (o, oLog) = try s.spawn(["generate", "--model", other.path, "--store", s.store.path, "x"], tag: "other")
        o.waitUntilExit()
        XCTAssertEqual(o.terminationStatus, 2)
        XCTAssertTrue(try String(contentsOf: oLog, encoding: .utf8).contains("another model"))
    }

    /// The store commands' `--version V` is the only `--version` in their help, its default reads HEAD,
    /// and `dafnet version` prints the tool's.
    func testVersionOptionIsNotShadowed() throws {
        let s = try Setup()
        for command in [["export", "--help"], ["archive", "create", "--help"]] {
            let (p, log) = try s.spawn(command, tag: command[0])
            p.waitUntilExit()
            let help = try String(contentsOf: log, encoding: .utf8)
            XCTAssertEqual(help.components(separatedBy: "\n").filter { $0.trimmingCharacters(in: .whitespaces).hasPrefix("--version") }.count, 1, help)
            XCTAssertTrue(help.contains("(default: HEAD)"), help)
        }
        let (v, vLog) = try s.spawn(["version"], tag: "version")
        v.waitUntilExit()
        XCTAssertEqual(try String(contentsOf: vLog, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines), "0.1.0")
    }

    /// One daemon per store: a second one exits at once with a clear message (exit status 3) while the
    /// first runs; SIGTERM stops the first cleanly (exit status 0) and a later run finishes everything.
    func testTwoDaemonsAndSIGTERM() throws {
        _ = try Self.executable()
        let s = try Setup()
        let batches = try Self.batches(6)
        for (name, data) in batches { try data.write(to: s.inbox.appendingPathComponent(name)) }
        let (a, aLog) = try s.spawn(s.arguments(once: false), tag: "first")
        defer { if a.isRunning { kill(a.processIdentifier, SIGKILL) } }
        let lockFile = s.store.appendingPathComponent(DaemonLock.fileName)
        XCTAssertTrue(Self.waitUntil(60) {
            (try? String(contentsOf: lockFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(a.processIdentifier)"
        }, "the first daemon takes the lock")

        let other = s.tmp.path("other-inbox")
        let (b, bLog) = try s.spawn(s.arguments(once: true, inbox: other), tag: "second")
        b.waitUntilExit()
        XCTAssertEqual(b.terminationStatus, 3)
        let message = try String(contentsOf: bLog, encoding: .utf8)
        XCTAssertTrue(message.contains("already processing") && message.contains("pid \(a.processIdentifier)"), message)
        XCTAssertFalse(FileManager.default.fileExists(atPath: other.path), "refused before touching anything")
        // In process too.
        XCTAssertThrowsError(try DaemonLock(store: s.store)) { e in
            guard case PipelineError.alreadyRunning("store", _, let pid)? = e as? PipelineError else { return XCTFail("\(e)") }
            XCTAssertEqual(pid, a.processIdentifier)
        }
        XCTAssertThrowsError(try DaemonLock(inbox: s.inbox), "one daemon per inbox too")

        _ = Self.waitUntil(30) { !s.names("done").isEmpty }
        kill(a.processIdentifier, SIGTERM)
        XCTAssertTrue(Self.waitUntil(60) { !a.isRunning }, "SIGTERM stops the daemon")
        a.waitUntilExit()
        XCTAssertEqual(a.terminationReason, .exit)
        XCTAssertEqual(a.terminationStatus, 0)
        let aText = try String(contentsOf: aLog, encoding: .utf8)
        XCTAssertTrue(aText.contains("SIGTERM") && aText.contains("daemon stopped"), aText)
        XCTAssertLessThanOrEqual(s.names("processing").count, 1, "at most the abandoned batch")

        // The lock went with the process.
        XCTAssertNoThrow(try DaemonLock(store: s.store))
        let (c, cLog) = try s.spawn(s.arguments(once: true), tag: "third")
        c.waitUntilExit()
        XCTAssertEqual(c.terminationStatus, 0, (try? String(contentsOf: cLog, encoding: .utf8)) ?? "")
        XCTAssertEqual(s.names("done"), batches.map(\.0))
        XCTAssertEqual(try CheckpointStore(at: s.store).versions().count, 6)
    }

    /// More files dropped at once than the inotify queue holds (fs.inotify.max_queued_events): the queue
    /// overflows, the batches' own events are lost, and the rescan on the overflow wake-up finds them. The
    /// flood happens while the daemon is not reading its queue (right before its wait), and the timer
    /// rescan is an hour away, so only the overflow path can pick the batches up.
    func testInotifyQueueOverflowTriggersARescan() throws {
        let h = try Harness()
        h.processor.settings.rescanInterval = 3600
        let limit = (try? String(contentsOfFile: "/proc/sys/fs/inotify/max_queued_events", encoding: .utf8))
            .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 16384
        let daemon = PipelineDaemon(processor: h.processor, lock: try DaemonLock(store: h.storeURL))
        let names = ["001.jsonl", "002.jsonl", "003.jsonl"]
        var flooded = false
        daemon.beforeWait = {
            guard !flooded else { return }
            flooded = true
            // limit + 100 closed-after-write events (dot-files: not batches, but inotify reports them).
            for i in 0..<(limit + 100) {
                let fd = open(h.inboxURL.path + "/.flood-\(i)", O_WRONLY | O_CREAT | O_CLOEXEC, 0o644)
                _ = write(fd, "x", 1)
                close(fd)
            }
            for (i, n) in names.enumerated() { try! h.drop(n, try! Fixture.batch(i..<(i + 1))) }
        }
        let finished = expectation(description: "daemon stopped")
        let runError = ErrorBox()
        let thread = Thread {
            do { try daemon.run(once: false) } catch { runError.set(error) }
            finished.fulfill()
        }
        thread.start()
        let done = Self.waitUntil(120) { h.names("done") == names }
        daemon.requestStop()
        wait(for: [finished], timeout: 60)
        XCTAssertNil(runError.get())
        XCTAssertTrue(done, "processed after the overflow: \(h.names("done"))")
        XCTAssertTrue(daemon.wakes.contains(.overflow), "the queue overflowed: \(daemon.wakes.prefix(5))")
        XCTAssertEqual(try h.store.versions(), [1, 2, 3])
    }
}

final class ErrorBox: @unchecked Sendable {
    private let lock = NSLock()
    private var error: Error?
    func set(_ e: Error) { lock.lock(); error = e; lock.unlock() }
    func get() -> Error? { lock.lock(); defer { lock.unlock() }; return error }
}
