import Editing
import Evaluation
import Foundation
import LanguageModel
import Storage
import TensorCore

/// The stages of one batch (`BatchStage`), each a function with its inputs and outputs; `process` runs
/// them in order and owns the retry when HEAD moves.
extension BatchProcessor {
    /// A claimed batch read and validated: its SHA-256 and edits, or the outcome that already ended it
    /// (a duplicate, a recovered commit, a rejection).
    enum ReadBatch {
        case edits(sha: String, requests: [EditRequest])
        case finished(BatchOutcome)
    }

    /// HEAD as loaded: its number and manifest (nil: the empty state), its edit state (installed on the
    /// model) and its edit log; and its evaluation when this processor committed it.
    struct LoadedHead {
        let number: Int?
        let manifest: Manifest?
        let state: EditorState
        var log: EditLog
        var evaluation: BatchReport? = nil
    }

    /// What is measured on HEAD before the batch: the sampled earlier edits and the watch list (one pass),
    /// HEAD's held-out perplexity, and the unedited model's locality predictions for the batch.
    struct BeforeBatch {
        let earlier: [EditRequest]
        let factItems: [ScoredPrompt]
        let facts: [TargetPrediction]
        let perplexity: Double?
        let localityReference: EditMetrics.LocalityReference
    }

    /// Stage `validation`: hash, duplicate check, size, parse, checks against the model.
    func readBatch(_ name: String, atStartup: Bool, times: inout StageTimes) throws -> ReadBatch {
        let t = Date()
        defer { times.parse = Date().timeIntervalSince(t) }
        let path = inbox.claimedPath(name)
        func fail(_ sha: String, _ error: BatchError) throws -> ReadBatch {
            times.parse = Date().timeIntervalSince(t)
            return .finished(try reject(name, sha: sha, error: error, stage: .validation, times: times))
        }
        guard let info = FileUtil.regularFileInfo(path) else {
            // Swapped for a symbolic link or a special file between the scan and the claim: never followed.
            if FileUtil.entryKind(path) != .missing {
                return try fail("", BatchError(file: name, line: 0, field: "", reason: "not a regular file (a symbolic link is never followed)"))
            }
            throw PipelineError.io(operation: "open", path: path, errno: ENOENT)
        }
        // A batch that cannot be read (permissions, an I/O error) fails like a malformed one: retrying it
        // at every start would block the inbox for good.
        func unreadable(_ error: Error) throws -> ReadBatch {
            try fail("", BatchError(file: name, line: 0, field: "", reason: "cannot read the file: \(error)"))
        }
        let sha: String
        do { sha = try FileHash.sha256(ofFileAt: URL(fileURLWithPath: path)) } catch { return try unreadable(error) }
        if let v = try lineageVersion(holding: sha) {
            return .finished(try finishCommitted(name, sha: sha, version: v, status: atStartup ? .recovered : .duplicate, times: times))
        }
        guard info.size <= settings.maxBatchBytes else {
            return try fail(sha, BatchError(file: name, line: 0, field: "", reason: "the file is larger than \(settings.maxBatchBytes) bytes"))
        }
        let data: Data
        do { data = try FileUtil.read(path, limit: settings.maxBatchBytes) } catch { return try unreadable(error) }
        do {
            let numbered = try EditBatch.parseNumbered(data, file: name, requireFinalNewline: true)
            try validateForModel(numbered, file: name)
            return .edits(sha: sha, requests: numbered.map(\.request))
        } catch let e as BatchError {
            return try fail(sha, e)
        }
    }

    /// Stage `load`: HEAD, installed: the version this processor committed last while it is still HEAD
    /// (kept in memory; versions never change), else fresh from the store (a rollback since the last batch
    /// is honoured).
    func loadHead() throws -> LoadedHead {
        // `apply` changes the state in place: the kept HEAD serves one batch, which commits the next one.
        let kept = committedHead
        committedHead = nil
        let current = try store.head()
        if let kept, let number = kept.number, current == number {
            editor.install(kept.state)
            return kept
        }
        guard let head = current else {
            let state = editor.newState()
            editor.install(state)
            return LoadedHead(number: nil, manifest: nil, state: state, log: EditLog(chunkSize: settings.editLogChunk))
        }
        let loaded = try store.load(.number(head))
        if !settings.allowOtherBaseModel { try loaded.manifest.requireBaseModel(resources.baseModelSHA256) }
        if let m = resources.editorSHA256, let s = loaded.manifest.editorSHA256, m != s {
            logger.warning("HEAD was made by another editor", metadata: ["head": "\(head)", "head_editor": "\(s)", "editor": "\(m)"])
        }
        let state = try VersionReplay.state(of: loaded, in: store, editor: editor, editorSHA256: resources.editorSHA256)
        return LoadedHead(number: head, manifest: loaded.manifest, state: state,
                          log: try EditLog.load(from: store, version: head, chunkSize: settings.editLogChunk))
    }

    /// Stage `load`, its measurements on HEAD. HEAD's perplexity is the `after` of HEAD's own evaluation
    /// when that was measured on the same texts (recomputed otherwise).
    func measureBefore(_ head: LoadedHead, _ requests: [EditRequest]) throws -> BeforeBatch {
        let model = editor.model
        // The batch's own prompts are left out: edits it supersedes are meant to change.
        let earlier = try head.log.sample(settings.retentionSample, excluding: Set(requests.map(\.prompt)))
        let items = (earlier + resources.watchList).map { editor.scored($0.prompt, $0.targetNew) }
        var perplexity: Double?
        if uneditedPerplexity != nil {
            if head.number == nil { perplexity = uneditedPerplexity }
            else if let p = (head.evaluation ?? headEvaluation(head))?.perplexity, p.textsFingerprint == heldoutFingerprint { perplexity = p.after }
            else { perplexity = model.perplexity(heldout, fixed: heldoutFixed) }
        }
        return BeforeBatch(earlier: earlier, factItems: items, facts: model.predict(items), perplexity: perplexity,
                           localityReference: try EditMetrics.localityReference(editor: editor, requests))
    }

    /// HEAD's own evaluation file, as committed with it (nil when it has none or it does not decode).
    func headEvaluation(_ head: LoadedHead) -> BatchReport? {
        guard let v = head.number, head.manifest?.files.contains(where: { $0.name == Self.evaluationFileInVersion }) == true,
              let data = try? store.fileData(Self.evaluationFileInVersion, in: .number(v)) else { return nil }
        return try? PipelineJSON.decoder.decode(BatchReport.self, from: data)
    }

    /// Stage `evaluate`: the edited model measured against `before`; the report with the guard's verdict
    /// (its version, state hash and timings are filled in later).
    func evaluate(_ name: String, sha: String, _ requests: [EditRequest], head: LoadedHead, before: BeforeBatch) throws -> BatchReport {
        let model = editor.model
        let ev = try EditMetrics.evaluate(editor: editor, requests, localityReference: before.localityReference, heldoutText: nil,
                                          answers: settings.answerTokens > 0, answerTokens: max(1, settings.answerTokens),
                                          fluencyTokens: settings.fluencyTokens, fluencySample: settings.fluencySample)
        let factsAfter = model.predict(before.factItems)
        let n = before.earlier.count
        let watched = resources.watchList.isEmpty ? nil
            : FactScore.scores(resources.watchList, before: before.facts[n...], after: factsAfter[n...])
        let retention = before.earlier.isEmpty ? nil : RetentionResult(
            sampled: n, earlierEdits: head.log.count, before: Self.meanAccuracy(before.facts.prefix(n)) ?? 0,
            after: Self.meanAccuracy(factsAfter.prefix(n)) ?? 0,
            perEdit: FactScore.scores(before.earlier, before: before.facts[..<n], after: factsAfter[..<n]))
        var canary = CanaryResult(probes: canaryItems.count, locality: nil, skipped: nil)
        if canaryItems.isEmpty {
            canary.skipped = resources.canaryNote ?? "no canary facts"
        } else {
            let after = model.predict(canaryItems, fixed: canaryFixed)
            canary.locality = zip(after, canaryReference).map { $0.agreement(with: $1) }.reduce(0, +) / Double(canaryItems.count)
        }
        var perplexity: PerplexityResult?
        if let u = uneditedPerplexity, let b = before.perplexity {
            perplexity = PerplexityResult(unedited: u, before: b, after: model.perplexity(heldout, fixed: heldoutFixed), texts: resources.heldoutText.count,
                                          textsFingerprint: heldoutFingerprint)
        }
        let verdict = settings.collapseGuard.check(reliability: ev.reliability, perplexity: perplexity, canary: canary, retention: retention)
        var report = BatchReport(batch: name, sha256: sha, status: verdict.passed ? .committed : .guarded, version: nil,
                                 parent: head.number, stateSHA256: nil, baseModelSHA256: resources.baseModelSHA256,
                                 editorSHA256: resources.editorSHA256, time: Timestamp.now(), edits: requests.count,
                                 totalEdits: head.state.editCount, reliability: ev.reliability, generality: ev.generality,
                                 locality: ev.locality, perEdit: ev.edits, retention: retention, watchList: watched, canary: canary,
                                 perplexity: perplexity, guardResult: verdict, timings: StageTimes())
        if let b = ev.fluencyBefore, let a = ev.fluencyAfter {
            report.fluency = FluencyResult(before: b, after: a, sampled: ev.edits.filter { $0.fluencyAfter != nil }.count,
                                           tokens: settings.fluencyTokens)
        }
        return report
    }

    /// What the version after `head` stores: its whole state, less what the editor derives from the rest,
    /// when rebuilding it would replay more than `keyframeEdits` edits (counted from the nearest version
    /// holding a whole state), the editor cannot rebuild anything, or the whole state costs little
    /// (`EditorState.wholeCostsLittle`); else the rest and how many edits rebuild it.
    func storedState(_ head: LoadedHead, adding edits: Int) -> (tensors: [String: Tensor], replayEdits: Int?, derived: [String]) {
        let tensors = head.state.tensors()
        let rebuilt = head.state.rebuiltByReplay
        let rebuildable = !rebuilt.isEmpty && !head.state.wholeCostsLittle
        guard let replay = settings.replayEdits(parent: head.manifest?.replayEdits, adding: edits, rebuildable: rebuildable) else {
            let derived = settings.keyframeEdits > 0 ? head.state.derivedFromRest : []
            return (tensors.filter { !derived.contains($0.key) }, nil, Array(derived))
        }
        return (tensors.filter { !rebuilt.contains($0.key) }, replay, [])
    }

    /// Stage `commit`: the new version on `head` with the edit log and the evaluation, returned as the new
    /// HEAD; nil when HEAD is no longer `head` (a rollback came first, or slipped in during the commit and
    /// was put back): the batch starts again from the new HEAD.
    func commit(_ name: String, sha: String, _ requests: [EditRequest], head: LoadedHead, report: BatchReport,
                blasThreads: Int) throws -> LoadedHead? {
        if try store.head() != head.number {
            logger.notice("HEAD moved while the batch was prepared; starting it again from the new HEAD",
                          metadata: ["batch": "\(name)", "was": "\(head.number.map(String.init) ?? "none")"])
            return nil
        }
        var log = head.log
        try log.append(requests)
        var files = log.files
        files[Self.evaluationFileInVersion] = try report.encoded()
        func num(_ x: Double?) -> JSONValue { x.map { $0.isFinite ? .double($0) : .string("\($0)") } ?? .null }
        let info: JSONValue = .object([
            "batch_edits": .int(Int64(requests.count)), "reliability": num(report.reliability),
            "generality": num(report.generality), "locality": num(report.locality),
            "perplexity_after": num(report.perplexity?.after), "canary_locality": num(report.canary.locality),
            "retention": num(report.retention?.after),
        ])
        let manifest: Manifest
        do {
            let (tensors, replayEdits, derived) = storedState(head, adding: requests.count)
            manifest = try store.commit(CommitRequest(tensors: tensors, files: files, baseModelSHA256: resources.baseModelSHA256,
                                                      editorSHA256: resources.editorSHA256, batch: BatchReference(name: name, sha256: sha),
                                                      info: info, replayEdits: replayEdits, blasThreads: blasThreads,
                                                      derived: derived))
        } catch StoreError.currentWithError(let v, let underlying) {
            logger.warning("committed, but a final step of the commit failed", metadata: ["version": "\(v)", "error": "\(underlying)"])
            manifest = try store.manifest(v)
        }
        noteLineage(manifest.version, parent: manifest.parent, batch: sha)
        if manifest.parent != head.number {
            // A rollback slipped in between the check and the commit: the new version would claim the
            // wrong parent. Put HEAD back where the rollback left it and apply the batch there.
            logger.warning("HEAD moved during the commit; undoing it and applying the batch again on the new HEAD",
                           metadata: ["batch": "\(name)", "version": "\(manifest.version)"])
            if let p = manifest.parent { try store.rollback(to: .number(p)) }
            return nil
        }
        return LoadedHead(number: manifest.version, manifest: manifest, state: head.state, log: log, evaluation: report)
    }
}
