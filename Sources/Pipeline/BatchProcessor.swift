import Editing
import Evaluation
import Foundation
import LanguageModel
import Logging
import Storage
import TensorCore

/// Settings of the pipeline (the CLI's `watch` options).
public struct PipelineSettings: Sendable {
    /// A batch is taken only once its file is this many seconds old (a producer that writes in place
    /// has finished by then; one that renames a finished file in is old enough at once).
    public var minimumFileAge = 1.0
    /// A batch that is empty or does not end with a newline is still being written: it (and every batch
    /// after it in name order) waits until it ends with one, or fails once it has not changed for this
    /// many seconds (a writer that stopped mid-line).
    public var unfinishedTimeout = 300.0
    /// Seconds between rescans of the inbox when inotify reports nothing.
    public var rescanInterval = 30.0
    public var collapseGuard = CollapseGuard()
    /// Earlier edits scored for retention.
    public var retentionSample = 32
    /// Tokens of the greedy answers before and after.
    public var answerTokens = 4
    /// Tokens of the continuations whose fluency (n-gram entropy) is measured before and after (0: none),
    /// and how many of a batch's edits get the check.
    public var fluencyTokens = 32
    public var fluencySample = 8
    /// Largest batch accepted, in edits and in bytes.
    public var maxEditsPerBatch = 10_000
    public var maxBatchBytes = 64 << 20
    /// Edits per edit-log file in a version.
    public var editLogChunk = 1000
    /// A version stores its whole edit state when more than this many edits would have to be applied again
    /// to rebuild it from the nearest version that does; else only what the editor cannot rebuild
    /// (`replay_edits`; DAFNet: its per-edit rows, not ΔW or the least-squares sums), and a whole version
    /// leaves out what the editor derives from the rest (`derived`: a least-squares ΔW). 0: every version
    /// whole, every tensor stored. Default 120: 100 versions of 10 edits on the sample model in 96.9 MB (README).
    public var keyframeEdits = 120
    /// Attempts at a batch while HEAD keeps moving under it (rollbacks) before giving up.
    public var maxAttempts = 5
    /// Commit on a HEAD made on another base model (its manifest's hash differs from the model's).
    public var allowOtherBaseModel = false

    public init() {}

    /// The `replay_edits` of a version whose parent has `parent` (nil: whole, or no parent) and which adds
    /// `edits`: nil when it stores its whole state (`keyframeEdits`), always nil when nothing of the state
    /// can be rebuilt.
    public func replayEdits(parent: Int?, adding edits: Int, rebuildable: Bool) -> Int? {
        let since = (parent ?? 0) + edits
        return keyframeEdits > 0 && rebuildable && since <= keyframeEdits ? since : nil
    }
}

/// What the processor measures with besides the model and editor.
public struct PipelineResources {
    /// Held-out text (token ids) for perplexity; empty skips the perplexity check.
    public var heldoutText: [[Int]]
    /// The canary facts; empty skips the canary check (with `canaryNote` as the reason).
    public var canaries: [EditRequest.LocalityPair]
    public var canaryNote: String?
    /// Recorded in every manifest.
    public var baseModelSHA256: String?
    public var editorSHA256: String?
    /// Facts checked after every batch, each with the answer it must give (`target_new`): one's own
    /// edits, or facts that must never change.
    public var watchList: [EditRequest]

    public init(heldoutText: [[Int]], canaries: [EditRequest.LocalityPair] = [], canaryNote: String? = nil,
                baseModelSHA256: String? = nil, editorSHA256: String? = nil, watchList: [EditRequest] = []) {
        self.heldoutText = heldoutText; self.canaries = canaries; self.canaryNote = canaryNote
        self.baseModelSHA256 = baseModelSHA256; self.editorSHA256 = editorSHA256; self.watchList = watchList
    }

    /// SHA-256 of a model folder's weights (`model.safetensors`, or the shard index) and of an editor
    /// folder's `editor.safetensors`.
    public static func hashes(modelFolder: URL, editorFolder: URL?) -> (model: String?, editor: String?) {
        let fm = FileManager.default
        let weights = ["model.safetensors", "model.safetensors.index.json"].map { modelFolder.appendingPathComponent($0) }
            .first { fm.fileExists(atPath: $0.path) }
        let model = weights.flatMap { try? FileHash.sha256(ofFileAt: $0) }
        let editor = editorFolder.flatMap { try? FileHash.sha256(ofFileAt: $0.appendingPathComponent(EditorRegistry.weightsFile)) }
        return (model, editor)
    }
}

/// What became of one batch.
public struct BatchOutcome: Sendable {
    public enum Status: String, Codable, Sendable {
        /// Applied, evaluated and committed as a new version.
        case committed
        /// An identical batch (same SHA-256) was committed before: nothing applied.
        case duplicate
        /// Found in `processing/` at start-up, already committed by an earlier run: finished without applying again.
        case recovered
        /// Invalid, or the editor refused it: moved to `failed/` with an error file; nothing applied.
        case rejected
        /// Refused by the collapse guard: moved to `failed/` with its evaluation; nothing committed.
        case guarded
        /// A stop was requested before the commit: left in `processing/`, processed first at the next start.
        case abandoned
    }

    public var batch: String
    public var sha256: String
    public var status: Status
    /// The version made (committed), found (duplicate, recovered), or HEAD left unchanged (rejected, guarded).
    public var version: Int?
    public var edits: Int
    /// Where the batch file went (`done/…`, `failed/…`, `processing/…`), relative to the inbox.
    public var location: String
    public var evaluationFile: URL?
    public var errorFile: URL?
    public var note: String?
    public var report: BatchReport?
    public var error: BatchErrorFile?
    public var timings: StageTimes
}

/// Turns claimed batch files into checkpoint versions, one at a time, exactly once: parse and validate
/// the whole batch, load HEAD's edit state from the store, apply the edits in order through the editor,
/// evaluate, run the collapse guard, commit, write the evaluation file and the history and journal lines,
/// and move the file to `done/` (or `failed/` with an error file).
///
/// Exactly once: the store's manifests (and, for versions `gc` removed, its commit records and the
/// journal) record every committed batch's SHA-256. A batch that HEAD's lineage already holds is never
/// applied again: dropped again it is a duplicate; found in
/// `processing/` at start-up (a crash after the commit) it is finished (evaluation file, history, journal,
/// move) from the evaluation stored with its version. A batch that was not committed is processed again
/// from the current HEAD. Every step after the commit is idempotent.
public final class BatchProcessor {
    public let inbox: Inbox
    public let store: CheckpointStore
    public let editor: SequentialEditor
    public let resources: PipelineResources
    public var settings: PipelineSettings
    public var logger: Logger
    /// Called with each finished batch (progress output).
    public var onOutcome: ((BatchOutcome) -> Void)?
    /// Checked between stages: when it returns true before the commit, the batch is abandoned.
    public var shouldStop: () -> Bool = { false }

    /// `STORE/evaluations/`: the evaluation files and the logs, all written through the store.
    public var evaluationsFolder: URL { store.evaluationsFolder }

    /// Version → its parent and batch SHA-256 (manifests never change, so read each once).
    private var lineageCache: [Int: (parent: Int?, batch: String?)] = [:]
    /// Records a version this processor committed in the lineage cache.
    func noteLineage(_ version: Int, parent: Int?, batch: String) { lineageCache[version] = (parent, batch) }
    /// The same for versions whose manifest `gc` removed: the parent from the store's commit records,
    /// the batch from the journal.
    private var removedLineage: [Int: (parent: Int?, batch: String?)] = [:]
    /// The version this processor committed last, kept for the next batch while it is HEAD.
    var committedHead: LoadedHead?
    /// (sha256, version) pairs already in the batch log.
    var historyKeys: Set<String> = []

    /// The held-out texts ordered by length, and their stream below the first edited block (computed once).
    let heldout: [[Int]]
    let heldoutFixed: FixedSequences
    let uneditedPerplexity: Double?
    let canaryItems: [ScoredPrompt]
    let canaryFixed: FixedSequences
    let canaryReference: [TargetPrediction]
    let heldoutFingerprint: String

    public static let evaluationFileInVersion = "evaluation.json"

    public init(inbox: Inbox, store: CheckpointStore, editor: SequentialEditor, resources: PipelineResources,
                settings: PipelineSettings = PipelineSettings(), logger: Logger = Logger(label: "dafnet.pipeline")) throws {
        self.inbox = inbox
        self.store = store
        self.editor = editor
        self.resources = resources
        self.settings = settings
        self.logger = logger
        let model = editor.model
        let texts = resources.heldoutText.enumerated().sorted { ($0.element.count, $0.offset) < ($1.element.count, $1.offset) }.map(\.element)
        heldout = texts
        let block = editor.firstEditedBlock
        let fixedTexts = try model.fixedSequences(TransformerLM.perplexityInputs(texts, spec: model.spec).inputs, reuseBelow: block,
                                                  rowsPerChunk: EditMetrics.fixedChunkRows)
        heldoutFixed = fixedTexts
        uneditedPerplexity = texts.isEmpty ? nil : model.withoutEdits { model.perplexity(texts, fixed: fixedTexts) }
        let items = resources.canaries.map { editor.scored($0.prompt, $0.groundTruth) }
        canaryItems = items
        let fixedCanaries = try model.fixedSequences(model.predictionInputs(items), reuseBelow: block, rowsPerChunk: EditMetrics.fixedChunkRows)
        canaryFixed = fixedCanaries
        canaryReference = model.withoutEdits { model.predict(items, fixed: fixedCanaries) }
        heldoutFingerprint = Self.fingerprint(resources.heldoutText)
        try loadJournal()
    }

    /// The history lines already written, and the lineage of versions `gc` removed (the store's
    /// commit records and the journal's committed batches).
    func loadJournal() throws {
        var batchOf: [Int: String] = [:]
        let decoder = JSONDecoder()
        for line in try store.lines(of: .journal) {
            guard let e = try? decoder.decode(JournalEntry.self, from: line) else { continue }
            if e.status == .committed, let v = e.version { batchOf[v] = e.sha256 }
        }
        for r in try store.history() where r.op == .commit {
            if let v = r.version { removedLineage[v] = (r.from, batchOf[v]) }
        }
        for line in try store.lines(of: .batches) {
            if let h = try? PipelineJSON.decoder.decode(HistoryLine.self, from: line) { historyKeys.insert(Self.historyKey(h)) }
        }
    }

    /// A committed batch has one line per version; a guarded one one per HEAD it was refused on.
    static func historyKey(_ h: HistoryLine) -> String {
        "\(h.sha256)@\(h.version.map(String.init) ?? "-")@\(h.status.rawValue)@\(h.parent.map(String.init) ?? "-")"
    }

    // MARK: Driving

    /// Finishes or reprocesses the batches a stopped daemon left in `processing/`, in order.
    @discardableResult
    public func recoverClaimed() throws -> [BatchOutcome] {
        // Temporary files of error files a crash interrupted (the store cleans its own when opened).
        for name in try FileUtil.list(inbox.failed.path) where name.hasPrefix(".tmp-") { unlink(inbox.failed.path + "/" + name) }
        var out: [BatchOutcome] = []
        for name in try inbox.claimed() {
            if shouldStop() { break }
            logger.info("batch found in processing/ at start-up", metadata: ["batch": "\(name)"])
            out.append(try process(claimed: name, atStartup: true))
        }
        return out
    }

    /// The next step for a look at the inbox: the first batch in name order, if it is old enough.
    public enum Next: Equatable {
        case batch(String)
        /// The first batch is younger than the minimum age: look again after this many seconds.
        case wait(Double)
        case empty
    }

    public func next(now: Date = Date()) throws -> Next {
        let scan = try inbox.scan(now: now)
        noteIgnored(scan.ignored)
        guard let first = scan.candidates.first else { return .empty }
        guard first.age >= settings.minimumFileAge else { return .wait(max(0.01, settings.minimumFileAge - first.age)) }
        if first.age < settings.unfinishedTimeout && !FileUtil.endsWithNewline(inbox.root.path + "/" + first.name) {
            if unfinishedNoted.insert(first.name).inserted {
                logger.notice("waiting for a batch that does not end with a newline yet (still being written?)",
                              metadata: ["batch": "\(first.name)", "timeout_seconds": "\(settings.unfinishedTimeout)"])
            }
            return .wait(min(1, max(0.01, settings.unfinishedTimeout - first.age)))
        }
        return .batch(first.name)
    }

    var unfinishedNoted: Set<String> = []

    var ignoredNoted: Set<String> = []
    /// Logs each entry of the inbox that is not taken once (per name and reason).
    func noteIgnored(_ entries: [Inbox.Ignored]) {
        for e in entries where ignoredNoted.insert(e.name + "\u{0}" + e.reason).inserted {
            logger.notice("ignoring an inbox entry", metadata: ["entry": "\(e.name)", "reason": "\(e.reason)"])
        }
    }

    /// Claims the batch `name` from the inbox and processes it (nil when it vanished before the claim).
    public func claimAndProcess(_ name: String) throws -> BatchOutcome? {
        guard let claimed = try inbox.claim(name) else { return nil }
        logger.info("batch claimed", metadata: ["batch": "\(claimed)"])
        return try process(claimed: claimed, atStartup: false)
    }

    /// Processes everything in the inbox in name order, waiting for young files to come of age, until the
    /// inbox is empty or a stop is requested (`watch --once`). Recovers `processing/` first.
    @discardableResult
    public func runOnce(sleep: (Double) -> Void = { Thread.sleep(forTimeInterval: $0) }) throws -> [BatchOutcome] {
        var out = try recoverClaimed()
        while !shouldStop() {
            switch try next() {
            case .empty: return out
            case .wait(let s):
                logger.debug("waiting for a young batch", metadata: ["seconds": "\(s)"])
                sleep(min(s, 0.5))
            case .batch(let name):
                if let o = try claimAndProcess(name) { out.append(o) }
            }
        }
        return out
    }

    // MARK: One batch

    /// Processes a batch already in `processing/`: its stages (`BatchStage`) in order, each timed; a stop
    /// request between stages abandons it before the commit; a HEAD that moved meanwhile starts it again
    /// from the new HEAD (at most `maxAttempts` times).
    public func process(claimed name: String, atStartup: Bool) throws -> BatchOutcome {
        var read = StageTimes()
        let sha: String, requests: [EditRequest]
        switch try readBatch(name, atStartup: atStartup, times: &read) {
        case .finished(let outcome): return outcome
        case let .edits(s, r): (sha, requests) = (s, r)
        }
        for attempt in 1... {
            var times = read
            var t = Date()
            func lap() -> Double { defer { t = Date() }; return Date().timeIntervalSince(t) }
            func stopped() -> BatchOutcome? { shouldStop() ? abandon(name, sha: sha, edits: requests.count, times: times) : nil }
            func refused(_ stage: BatchStage, _ reason: String, report: BatchReport? = nil, head: Int?) throws -> BatchOutcome {
                try reject(name, sha: sha, error: BatchError(file: name, line: 0, field: "", reason: reason), stage: stage, head: head,
                           report: report, times: times)
            }
            if let o = stopped() { return o }
            let head = try loadHead()
            times.load = lap()
            let before = try measureBefore(head, requests)
            times.evaluate = lap()
            if let o = stopped() { return o }
            // An edit whose prompt an earlier live edit has replaces it (the same fact, a new target).
            let superseded = try head.log.superseded(by: requests)
            // Recorded in the version: a replay of the batch runs at the same count (`Manifest.blasThreads`).
            let blasThreads = BLAS.threads
            do {
                let e = try editor.apply(requests, to: head.state, superseding: superseded)
                times.signal = e.signal; times.auxiliary = e.auxiliary; times.apply = e.apply
            } catch {
                return try refused(.apply, "the editor refused the batch: \(error)", head: head.number)
            }
            t = Date()
            var report: BatchReport
            do { report = try evaluate(name, sha: sha, requests, head: head, before: before) } catch {
                return try refused(.evaluate, "evaluation failed: \(error)", head: head.number)
            }
            if !superseded.isEmpty {
                report.superseded = superseded.map { SupersededEdit(prompt: $0.request.prompt, targetNew: $0.request.targetNew) }
                logger.notice("the batch edits facts edited before: their earlier edits are replaced",
                              metadata: ["batch": "\(name)", "superseded": "\(superseded.count)"])
            }
            times.evaluate += lap()
            report.timings = times
            if !report.guardResult.passed {
                return try refused(.guard, "collapse guard: " + report.guardResult.violations.joined(separator: "; "), report: report,
                                   head: head.number)
            }
            if let o = stopped() { return o }
            guard let newHead = try commit(name, sha: sha, requests, head: head, report: report,
                                                  blasThreads: blasThreads), let manifest = newHead.manifest else {
                guard attempt < settings.maxAttempts else { throw PipelineError.headUnstable(batch: name, attempts: attempt) }
                continue
            }
            committedHead = newHead
            times.commit = lap()
            report.version = manifest.version
            report.stateSHA256 = manifest.stateSHA256
            report.timings = times
            return try finishCommitted(name, sha: sha, version: manifest.version, status: .committed, times: times, report: report)
        }
        fatalError("unreachable: the attempts loop returns or throws")
    }

    /// Checks the edits against the model: the target has tokens, prompt + target fit the context.
    func validateForModel(_ numbered: [(line: Int, request: EditRequest)], file: String) throws {
        if numbered.count > settings.maxEditsPerBatch {
            throw BatchError(file: file, line: 0, field: "", reason: "\(numbered.count) edits; at most \(settings.maxEditsPerBatch) per batch")
        }
        let maxT = editor.model.spec.maxPositions
        // One target per fact in a batch: an edit of a prompt replaces the earlier batches' edit of it, but
        // two targets side by side in one call would be averaged.
        var targetOf: [String: (line: Int, target: String)] = [:]
        for (line, r) in numbered {
            if let seen = targetOf[r.prompt], seen.target != r.targetNew {
                throw BatchError(file: file, line: line, field: "target_new",
                                 reason: "line \(seen.line) edits the same prompt to \"\(seen.target)\": one target per prompt in a batch")
            }
            targetOf[r.prompt] = targetOf[r.prompt] ?? (line, r.targetNew)
        }
        for (line, r) in numbered {
            // Every prompt the batch is applied and scored with, with the answer it is scored on; the
            // longer of the two is named when they do not fit.
            var pairs = [(prompt: r.prompt, promptField: "prompt", answer: r.targetNew)]
            pairs += r.rephrases.enumerated().map { (i, p) in (p, r.rephrases.count == 1 ? "rephrase_prompt" : "rephrase_prompt[\(i)]", r.targetNew) }
            pairs += r.locality.enumerated().map { (i, l) in (l.prompt, r.locality.count == 1 ? "locality_prompt" : "locality[\(i)].prompt", l.groundTruth) }
            for (k, pair) in pairs.enumerated() {
                let s = editor.scored(pair.prompt, pair.answer)
                let answerField = k <= r.rephrases.count ? "target_new" : pair.promptField.replacingOccurrences(of: "prompt", with: "ground_truth")
                if s.targetIds.isEmpty { throw BatchError(file: file, line: line, field: answerField, reason: "has no tokens") }
                let n = s.promptIds.count + s.targetIds.count
                if n > maxT {
                    let field = s.targetIds.count > s.promptIds.count ? answerField : pair.promptField
                    throw BatchError(file: file, line: line, field: field,
                                     reason: "\(pair.promptField) + \(answerField) is \(n) tokens (\(s.promptIds.count) + \(s.targetIds.count)); the model takes at most \(maxT)")
                }
            }
        }
    }

    /// The version of HEAD's lineage (HEAD and its ancestors) that committed the batch with this
    /// SHA-256, if any: a batch is already applied only when the current state holds it, so after a
    /// rollback past it the same batch applies again. A manifest that cannot be read ends the walk
    /// (loading HEAD then reports the damage); one that `gc` removed is known from the records.
    func lineageVersion(holding sha: String) throws -> Int? {
        var v = try store.head()
        var seen = Set<Int>()
        while let at = v, seen.insert(at).inserted {
            if lineageCache[at] == nil {
                if let m = try? store.manifest(at) {
                    lineageCache[at] = (m.parent, m.batch?.sha256)
                } else if let r = removedLineage[at], try !store.versions().contains(at) {
                    lineageCache[at] = r
                } else {
                    logger.warning("a manifest of HEAD's lineage cannot be read", metadata: ["version": "\(at)"])
                    return nil
                }
            }
            let entry = lineageCache[at]!
            if entry.batch == sha { return at }
            v = entry.parent
        }
        return nil
    }

    /// The steps after a commit (all idempotent): evaluation file, history line, journal line, move to done/.
    /// For a duplicate or a recovered batch, the report is the one stored with the version.
    func finishCommitted(_ name: String, sha: String, version: Int, status: BatchOutcome.Status, times: StageTimes,
                         report given: BatchReport? = nil) throws -> BatchOutcome {
        let t = Date()
        var report = given
        var evaluationFile: URL?
        var note: String?
        switch status {
        case .committed, .recovered:
            if report == nil {
                // Recovered: the evaluation as committed with the version (the commit's own time is unknown).
                if let m = try? store.manifest(version), m.files.contains(where: { $0.name == Self.evaluationFileInVersion }) {
                    var r = try PipelineJSON.decoder.decode(BatchReport.self, from: try store.fileData(Self.evaluationFileInVersion, in: .number(version)))
                    r.version = version
                    r.stateSHA256 = m.stateSHA256
                    r.parent = m.parent
                    report = r
                }
                note = "found in processing/ at start-up; version \(version) already holds it: not applied again"
            }
            if let r = report {
                let fileName = BatchReport.fileName(batch: r.batch, version: version)
                var final = r
                final.timings = status == .committed ? times : r.timings
                if status == .committed { final.timings.finish = 0 }
                let data = try final.encoded()
                let url = try store.writeEvaluationsFile(data, named: fileName)
                // And in the version's own folder, which archives carry with the version.
                try store.writeEvaluationFile(data, named: fileName, for: version)
                evaluationFile = url
                let line = final.historyLine
                if !historyKeys.contains(Self.historyKey(line)) {
                    try store.append(try PipelineJSON.line(line), to: .batches)
                    historyKeys.insert(Self.historyKey(line))
                }
                report = final
            }
        case .duplicate:
            let original = (try? store.manifest(version))?.batch?.name
            note = "identical to \(original.map { "batch \($0), " } ?? "")committed as version \(version): not applied again"
        default:
            break
        }
        try journal(JournalEntry(time: Timestamp.now(), batch: name, sha256: sha, status: status == .recovered ? .committed : status,
                                 version: version, note: note))
        let moved = try inbox.markDone(name)
        var finalTimes = times
        finalTimes.finish = Date().timeIntervalSince(t)
        let outcome = BatchOutcome(batch: name, sha256: sha, status: status, version: version, edits: report?.edits ?? 0,
                                   location: "done/" + moved, evaluationFile: evaluationFile, errorFile: nil, note: note,
                                   report: report, error: nil, timings: finalTimes)
        switch status {
        case .committed:
            var md: Logger.Metadata = ["batch": "\(name)", "version": "\(version)", "parent": "\(report?.parent.map(String.init) ?? "none")",
                                       "edits": "\(report?.edits ?? 0)", "sha256": "\(sha.prefix(12))",
                                       "seconds": "\(String(format: "%.3f", finalTimes.total))"]
            if let r = report {
                md["reliability"] = "\(Self.f(r.reliability))"
                md["generality"] = "\(r.generality.map(Self.f) ?? "-")"
                md["locality"] = "\(r.locality.map(Self.f) ?? "-")"
                md["perplexity"] = "\(r.perplexity.map { Self.f($0.before) + "→" + Self.f($0.after) } ?? "-")"
                md["canary_locality"] = "\(r.canary.locality.map(Self.f) ?? "-")"
                md["retention"] = "\(r.retention.map { Self.f($0.after) } ?? "-")"
            }
            logger.info("batch committed", metadata: md)
        case .duplicate:
            logger.notice("duplicate batch: not applied again", metadata: ["batch": "\(name)", "version": "\(version)", "note": "\(note ?? "")"])
        case .recovered:
            logger.notice("batch recovered: already committed before the restart", metadata: ["batch": "\(name)", "version": "\(version)"])
        default: break
        }
        onOutcome?(outcome)
        return outcome
    }

    /// Moves a batch to failed/ with its error file; HEAD is untouched.
    func reject(_ name: String, sha: String, error: BatchError, stage: BatchStage, head: Int?? = nil, report: BatchReport? = nil,
                times: StageTimes) throws -> BatchOutcome {
        let t = Date()
        let h: Int? = try head ?? store.head()
        let err = BatchErrorFile(batch: name, sha256: sha, stage: stage, line: error.line, field: error.field, reason: error.reason,
                                 time: Timestamp.now(), head: h, evaluation: report)
        if let report {
            // Before the move, so a crash in between gives the line once (the retry finds it).
            let line = report.historyLine
            if !historyKeys.contains(Self.historyKey(line)) {
                try store.append(try PipelineJSON.line(line), to: .batches)
                historyKeys.insert(Self.historyKey(line))
            }
        }
        let moved = try inbox.markFailed(name, error: try PipelineJSON.pretty(err))
        let status: BatchOutcome.Status = stage == .guard ? .guarded : .rejected
        try journal(JournalEntry(time: Timestamp.now(), batch: name, sha256: sha, status: status, version: h,
                                 note: error.description))
        var times = times
        times.finish = Date().timeIntervalSince(t)
        let outcome = BatchOutcome(batch: name, sha256: sha, status: status, version: h, edits: report?.edits ?? 0,
                                   location: "failed/" + moved, evaluationFile: nil,
                                   errorFile: inbox.failed.appendingPathComponent(moved + Inbox.errorSuffix),
                                   note: error.description, report: report, error: err, timings: times)
        if status == .guarded {
            logger.warning("batch refused by the collapse guard; HEAD unchanged",
                           metadata: ["batch": "\(name)", "head": "\(h.map(String.init) ?? "none")", "reason": "\(error.reason)"])
        } else {
            logger.error("batch rejected; nothing applied",
                         metadata: ["batch": "\(name)", "stage": "\(stage.rawValue)", "line": "\(error.line)", "field": "\(error.field)",
                                    "reason": "\(error.reason)"])
        }
        onOutcome?(outcome)
        return outcome
    }

    func abandon(_ name: String, sha: String, edits: Int, times: StageTimes) -> BatchOutcome {
        logger.notice("stop requested: batch abandoned before its commit; it stays in processing/ and is processed first at the next start",
                      metadata: ["batch": "\(name)"])
        let o = BatchOutcome(batch: name, sha256: sha, status: .abandoned, version: nil, edits: edits, location: "processing/" + name,
                             evaluationFile: nil, errorFile: nil, note: "stop requested before the commit", report: nil, error: nil,
                             timings: times)
        onOutcome?(o)
        return o
    }

    func journal(_ e: JournalEntry) throws {
        try store.append(try PipelineJSON.line(e), to: .journal)
    }

    // MARK: Helpers

    static func meanAccuracy<C: Collection>(_ p: C) -> Double? where C.Element == TargetPrediction {
        p.isEmpty ? nil : p.map(\.accuracy).reduce(0, +) / Double(p.count)
    }

    static func f(_ x: Double) -> String { String(format: "%.3f", x) }

    /// FNV-1a over the token ids (cache key for the perplexity of a version).
    static func fingerprint(_ texts: [[Int]]) -> String {
        var h = FNV1a()
        h.mix(texts.count)
        for t in texts { h.mix(t.count); for id in t { h.mix(id) } }
        return String(format: "fnv1a64:%016llx", h.value)
    }
}

/// JSON settings shared by the pipeline's files: sorted keys, non-finite numbers as strings.
public enum PipelineJSON {
    static func encoder(pretty: Bool) -> JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = pretty ? [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        e.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return e
    }

    public static var decoder: JSONDecoder {
        let d = JSONDecoder()
        d.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        return d
    }

    /// Compact one-line JSON.
    public static func line<T: Encodable>(_ v: T) throws -> Data { try encoder(pretty: false).encode(v) }

    /// Pretty JSON with a final newline.
    public static func pretty<T: Encodable>(_ v: T) throws -> Data {
        var d = try encoder(pretty: true).encode(v)
        d.append(UInt8(ascii: "\n"))
        return d
    }
}
