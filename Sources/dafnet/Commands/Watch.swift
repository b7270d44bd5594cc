import ArgumentParser
import Editing
import Foundation
import LanguageModel
import Logging
import Pipeline
import Storage

/// `dafnet watch`: the inbox daemon. Batches dropped into the inbox become checkpoint versions, in
/// file-name order, exactly once; each gets an evaluation file, and bad or collapsing batches go to
/// `failed/` with the reason.
struct Watch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Turn batches dropped into an inbox into checkpoint versions, in order, exactly once.",
        discussion: """
        Drop one JSON Lines file of edits per batch into the inbox (write it as a dot-file or *.tmp, then rename \
        it in; name batches with a zero-padded counter, e.g. 000042-topic.jsonl: they are taken in file-name order). \
        Each batch is claimed into INBOX/processing/, validated whole, applied on HEAD's edit state, evaluated, \
        checked by the collapse guard, committed as a new version, and moved to INBOX/done/ (or to INBOX/failed/ \
        beside NAME.error.json). Evaluation files go to STORE/evaluations/NAME.vNNNN.json, one line per batch to \
        STORE/evaluations/batches.jsonl (see `dafnet report`). One daemon per store; SIGTERM/SIGINT stop it cleanly.
        """)

    @Flag(help: "Process what is in the inbox, then exit (scripts and CI).")
    var once = false
    @Option(help: "The inbox folder (created with processing/, done/ and failed/ if missing).")
    var inbox = "./inbox"
    @OptionGroup var location: StoreLocationOptions
    @OptionGroup var model: ModelOption
    @OptionGroup var editorOption: EditorOption
    @Option(help: "Held-out text for perplexity, one text per line (default: samples/world/heldout_text.txt).")
    var text: String?
    @Option(help: "Held-out lines used for perplexity.")
    var textLines = 100
    @Option(help: "Canary facts (JSON Lines: locality_prompt + locality_ground_truth, or prompt + ground_truth; lines with a split other than heldout are skipped). Default: samples/world/facts.jsonl.")
    var canaries: String?
    @Option(help: "A watch list: facts (batch layout; prompt + target_new, the answer each must give) scored after every batch, each in the evaluation file and the report.")
    var watchList: String?
    @Option(help: "How many canary facts to take from the file.")
    var canaryCount = 20
    @Option(help: "Seconds a batch file must have been left alone before it is taken.")
    var minAge: Double = 1
    @Option(help: "Seconds a batch that is empty or lacks its final newline waits (it and the batches after it) before it fails as unfinished.")
    var unfinishedTimeout: Double = 300
    @Option(help: "Seconds between rescans of the inbox besides inotify.")
    var rescanInterval: Double = 30
    @Flag(help: "Commit on a HEAD made on another base model (by default an error naming both weight hashes).")
    var allowOtherBaseModel = false
    @Flag(help: "Turn the collapse guard off (its measurements are still recorded).")
    var noGuard = false
    @Option(help: "Collapse guard: largest held-out perplexity, as a multiple of the unedited model's.")
    var maxPerplexityRatio: Double = CollapseGuard().maxPerplexityRatio
    @Option(help: "Collapse guard: smallest locality on the canary facts.")
    var minCanaryLocality: Double = CollapseGuard().minCanaryLocality
    @Option(help: "Collapse guard: smallest retention (reliability on a sample of earlier edits; 0 for an editor that forgets by design).")
    var minRetention: Double = CollapseGuard().minRetention
    @Option(help: "Collapse guard: smallest reliability of the batch's own edits.")
    var minReliability: Double = CollapseGuard().minReliability
    @Option(help: "A version stores its whole edit state once more than this many edits would have to be applied again to rebuild it from the last version that does; else only what the editor cannot rebuild (0: every version whole).")
    var keyframeEdits = PipelineSettings().keyframeEdits
    @Option(help: "Earlier edits sampled for retention.")
    var retentionSample = 32
    @Option(help: "Tokens of the greedy answers before and after, per edit (0: none).")
    var answerTokens = 4
    @Option(help: "Tokens of the continuations whose fluency (n-gram entropy) is measured before and after (0: none).")
    var fluencyTokens = PipelineSettings().fluencyTokens
    @Option(help: "Edits per batch whose fluency is measured (evenly spaced).")
    var fluencySample = PipelineSettings().fluencySample
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"
    @Option(help: "Log format on standard error: text or json.")
    var logFormat = "text"
    @Flag(help: "No progress lines on standard output.")
    var quiet = false

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("--log-level: \(logLevel) is not a level") }
        guard StructuredLogHandler.Format(rawValue: logFormat) != nil else { throw ValidationError("--log-format: text or json") }
        guard minAge >= 0, rescanInterval > 0, unfinishedTimeout >= 0 else {
            throw ValidationError("--min-age and --unfinished-timeout must be ≥ 0 and --rescan-interval > 0")
        }
        guard maxPerplexityRatio > 0 else { throw ValidationError("--max-perplexity-ratio must be positive") }
        guard retentionSample >= 0, answerTokens >= 0, fluencyTokens >= 0, fluencySample >= 0, canaryCount >= 0, textLines >= 0,
              keyframeEdits >= 0 else {
            throw ValidationError("counts must be 0 or more")
        }
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel)!
        let format = StructuredLogHandler.Format(rawValue: logFormat)!
        let logger = Logger(label: "dafnet.watch") { StructuredLogHandler(label: $0, level: level, format: format) }

        // The daemon lock first: a second daemon stops here, before loading anything.
        let lock: DaemonLock, inboxLock: DaemonLock
        do {
            lock = try DaemonLock(store: location.url)
            inboxLock = try DaemonLock(inbox: URL(fileURLWithPath: inbox))
        } catch let e as PipelineError {
            printError("error: \(e)")
            if case .alreadyRunning = e { throw ExitCode(ExitStatus.alreadyRunning) }
            throw ExitCode(ExitStatus.failure)
        }
        let store = try runMapped { try location.open(create: true) }
        if let r = store.recovery, !r.isEmpty {
            logger.notice("the store cleaned up after an interrupted operation", metadata: [
                "temporary_files": "\(r.removedTemporary.count)", "blobs": "\(r.removedBlobs.count)",
                "unfinished_versions": "\(r.removedUnfinishedVersions.map(String.init).joined(separator: ","))"])
        }
        let folder = try model.load(requireTokenizer: true)
        guard let tok = folder.tokenizer else { throw ValidationError("the model folder has no tokenizer.json") }
        let editor = try runMapped { try EditorRegistry.load(from: editorOption.url, model: folder.model, tokenizer: tok) }
        let texts = textLines == 0 ? [] : heldoutText(text, tokenizer: { tok.encode($0) }, limit: textLines)
        var canaryNote: String?
        var probes: [EditRequest.LocalityPair] = []
        let canaryURL = canaries.map { URL(fileURLWithPath: $0) } ?? Embedded.samples().appendingPathComponent("world/facts.jsonl")
        if canaryCount == 0 {
            canaryNote = "--canary-count 0"
        } else if FileManager.default.fileExists(atPath: canaryURL.path) {
            probes = try runMapped { try Canaries.load(canaryURL, limit: canaryCount) }
            if probes.isEmpty { canaryNote = "\(canaryURL.path) holds no canary facts" }
        } else {
            if canaries != nil { throw ValidationError("--canaries: \(canaryURL.path) does not exist") }
            canaryNote = "no canary file (\(canaryURL.path) does not exist)"
        }
        if let canaryNote { logger.notice("canary check skipped", metadata: ["reason": "\(canaryNote)"]) }
        let hashes = PipelineResources.hashes(modelFolder: model.url, editorFolder: editorOption.url)
        let watched = try watchList.map { path in try runMapped { try EditBatch.read(URL(fileURLWithPath: path)) } } ?? []
        let resources = PipelineResources(heldoutText: texts, canaries: probes, canaryNote: canaryNote,
                                          baseModelSHA256: hashes.model, editorSHA256: hashes.editor, watchList: watched)
        var settings = PipelineSettings()
        settings.minimumFileAge = minAge
        settings.unfinishedTimeout = unfinishedTimeout
        settings.allowOtherBaseModel = allowOtherBaseModel
        settings.rescanInterval = rescanInterval
        settings.collapseGuard.enabled = !noGuard
        settings.collapseGuard.maxPerplexityRatio = maxPerplexityRatio
        settings.collapseGuard.minCanaryLocality = minCanaryLocality
        settings.collapseGuard.minRetention = minRetention
        settings.collapseGuard.minReliability = minReliability
        settings.retentionSample = retentionSample
        settings.keyframeEdits = keyframeEdits
        settings.answerTokens = answerTokens
        settings.fluencyTokens = fluencyTokens; settings.fluencySample = fluencySample
        let processor = try runMapped {
            try BatchProcessor(inbox: try Inbox(URL(fileURLWithPath: inbox)), store: store, editor: editor,
                               resources: resources, settings: settings, logger: logger)
        }
        var n = 0
        let quiet = self.quiet
        processor.onOutcome = { o in
            n += 1
            if !quiet { print(Self.progressLine(n, o)); fflush(stdout) }
        }
        let daemon = PipelineDaemon(processor: processor, lock: lock)
        daemon.installSignalHandlers()
        let summary = try runMapped { try daemon.run(once: once) }
        withExtendedLifetime(inboxLock) {}
        if !quiet {
            print("\(summary.count(.committed)) committed, \(summary.count(.rejected)) rejected, \(summary.count(.guarded)) refused by the guard, "
                  + "\(summary.count(.duplicate)) duplicates, \(summary.count(.recovered)) recovered"
                  + (summary.count(.abandoned) > 0 ? ", \(summary.count(.abandoned)) abandoned (left in processing/)" : "")
                  + "; HEAD \((try? store.head()).flatMap { $0 }.map { "version \($0)" } ?? "none")")
        }
        // Scripts can tell a run that left batches in failed/.
        if summary.count(.rejected) + summary.count(.guarded) > 0 { throw ExitCode(ExitStatus.batchesFailed) }
    }

    static func progressLine(_ n: Int, _ o: BatchOutcome) -> String {
        func f(_ x: Double?) -> String { x.map { String(format: "%.2f", $0) } ?? "-" }
        switch o.status {
        case .committed:
            let r = o.report
            var s = "[\(n)] \(o.batch): version \(o.version ?? 0) (\(o.edits) edits; reliability \(f(r?.reliability)), generality \(f(r?.generality)), "
                + "locality \(f(r?.locality))"
            if let c = r?.canary.locality { s += ", canary \(f(c))" }
            if let ret = r?.retention { s += ", retention \(f(ret.before))→\(f(ret.after))" }
            if let p = r?.perplexity { s += ", perplexity \(f(p.before))→\(f(p.after))" }
            return s + String(format: ") in %.2f s", o.timings.total)
        case .duplicate, .recovered:
            return "[\(n)] \(o.batch): \(o.status.rawValue), \(o.note ?? "")"
        case .rejected:
            let e = o.error
            let place = e.map { $0.line > 0 ? "line \($0.line), field \"\($0.field)\": " : "" } ?? ""
            return "[\(n)] \(o.batch): rejected (\(place)\(e?.reason ?? "")) → \(o.location)"
        case .guarded:
            return "[\(n)] \(o.batch): refused by the collapse guard (\(o.error?.reason ?? "")) → \(o.location)"
        case .abandoned:
            return "[\(n)] \(o.batch): abandoned (stop requested); left in processing/"
        }
    }
}
