import Editing
import Evaluation
import Foundation
import LanguageModel
import Storage

/// Seconds spent per stage of one batch.
public struct StageTimes: Codable, Sendable, Equatable {
    /// Read, hash, parse and validate the batch file.
    public var parse = 0.0
    /// Load HEAD's edit state and edit log from the store and install them.
    public var load = 0.0
    /// The editor's stages (`EditTimings`): gradient signals, auxiliary network, ΔW update.
    public var signal = 0.0
    public var auxiliary = 0.0
    public var apply = 0.0
    /// Every measurement before and after (metrics, answers, retention, canaries, perplexity) and the guard.
    public var evaluate = 0.0
    /// The store commit.
    public var commit = 0.0
    /// Evaluation file, history and journal lines, the move to done/ or failed/.
    public var finish = 0.0

    public init() {}

    public var total: Double { parse + load + signal + auxiliary + apply + evaluate + commit + finish }

    public static let stageNames = ["parse", "load", "signal", "auxiliary", "apply", "evaluate", "commit", "finish"]

    public var byName: [(String, Double)] {
        [("parse", parse), ("load", load), ("signal", signal), ("auxiliary", auxiliary), ("apply", apply),
         ("evaluate", evaluate), ("commit", commit), ("finish", finish)]
    }

    public static func + (a: StageTimes, b: StageTimes) -> StageTimes {
        var s = StageTimes()
        s.parse = a.parse + b.parse; s.load = a.load + b.load; s.signal = a.signal + b.signal
        s.auxiliary = a.auxiliary + b.auxiliary; s.apply = a.apply + b.apply; s.evaluate = a.evaluate + b.evaluate
        s.commit = a.commit + b.commit; s.finish = a.finish + b.finish
        return s
    }

    enum CodingKeys: String, CodingKey { case parse, load, signal, auxiliary, apply, evaluate, commit, finish, total }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        func v(_ k: CodingKeys) throws -> Double { try c.decodeIfPresent(Double.self, forKey: k) ?? 0 }
        parse = try v(.parse); load = try v(.load); signal = try v(.signal); auxiliary = try v(.auxiliary)
        apply = try v(.apply); evaluate = try v(.evaluate); commit = try v(.commit); finish = try v(.finish)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        for (k, v) in zip([CodingKeys.parse, .load, .signal, .auxiliary, .apply, .evaluate, .commit, .finish],
                          [parse, load, signal, auxiliary, apply, evaluate, commit, finish]) { try c.encode(v, forKey: k) }
        try c.encode(total, forKey: .total)
    }
}

/// An earlier edit that a batch replaced: its prompt and the target it had.
public struct SupersededEdit: Codable, Sendable, Equatable {
    public var prompt: String
    public var targetNew: String

    enum CodingKeys: String, CodingKey { case prompt, targetNew = "target_new" }
}

/// Reliability on a sample of edits made by earlier batches: before this batch and after it.
public struct RetentionResult: Codable, Sendable, Equatable {
    /// How many earlier edits were scored, out of how many there are.
    public var sampled: Int
    public var earlierEdits: Int
    public var before: Double
    public var after: Double
    /// Each sampled earlier edit scored before and after the batch (absent in evaluation files written
    /// before it was recorded).
    public var perEdit: [FactScore]?

    enum CodingKeys: String, CodingKey { case sampled, earlierEdits = "earlier_edits", before, after, perEdit = "per_edit" }
}

/// Locality on the fixed canary facts: the share of their answer tokens where the edited model's argmax
/// equals the unedited model's.
public struct CanaryResult: Codable, Sendable, Equatable {
    public var probes: Int
    public var locality: Double?
    /// Set when the check was skipped (no canary set).
    public var skipped: String?
}

/// Held-out perplexity: the unedited model, HEAD before the batch, and after it.
/// Fluency (n-gram entropy, `EditMetrics.ngramEntropy`) of longer greedy continuations of a sample of the
/// batch's edit prompts, on the unedited model and after the batch.
public struct FluencyResult: Codable, Sendable, Equatable {
    public var before: Double
    public var after: Double
    public var sampled: Int
    public var tokens: Int
}

public struct PerplexityResult: Codable, Sendable, Equatable {
    public var unedited: Double
    public var before: Double
    public var after: Double
    public var ratioToUnedited: Double { unedited > 0 ? after / unedited : .infinity }
    public var texts: Int
    /// A fingerprint of the held-out texts' tokens: the next batch takes `after` as its `before` only when
    /// it measures on the same texts.
    public var textsFingerprint: String?

    enum CodingKeys: String, CodingKey {
        case unedited, before, after, ratioToUnedited = "ratio_to_unedited", texts, textsFingerprint = "texts_fingerprint"
    }

    public init(unedited: Double, before: Double, after: Double, texts: Int, textsFingerprint: String? = nil) {
        self.unedited = unedited; self.before = before; self.after = after; self.texts = texts; self.textsFingerprint = textsFingerprint
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        unedited = try c.decode(Double.self, forKey: .unedited); before = try c.decode(Double.self, forKey: .before)
        after = try c.decode(Double.self, forKey: .after); texts = try c.decode(Int.self, forKey: .texts)
        textsFingerprint = try c.decodeIfPresent(String.self, forKey: .textsFingerprint)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(unedited, forKey: .unedited); try c.encode(before, forKey: .before); try c.encode(after, forKey: .after)
        try c.encode(ratioToUnedited, forKey: .ratioToUnedited); try c.encode(texts, forKey: .texts)
        try c.encodeIfPresent(textsFingerprint, forKey: .textsFingerprint)
    }
}

/// What the collapse guard decided.
public struct GuardResult: Codable, Sendable, Equatable {
    public var enabled: Bool
    public var passed: Bool
    public var settings: CollapseGuard
    /// One sentence per threshold crossed.
    public var violations: [String]
    /// Checks that could not run (no canaries, no earlier edits, …).
    public var notes: [String]
}

/// The evaluation file of one batch, `STORE/evaluations/NAME.vNNNN.json`. The same file is written to the
/// version's folder `STORE/evaluations/vNNNNNNNN/NAME.vNNNN.json` (archives carry it), and committed with
/// the version as its file `evaluation.json` (without the commit's own timing: a restart after a crash
/// between the commit and the evaluation file rebuilds the file from it). A guarded batch's evaluation is
/// inside its `failed/NAME.error.json`.
public struct BatchReport: Codable, Sendable {
    public static let currentFormat = "dafnet-batch-evaluation/1"

    public var format = BatchReport.currentFormat
    public var batch: String
    public var sha256: String
    /// `committed` or `guarded`.
    public var status: BatchOutcome.Status
    /// The version this batch made (nil when guarded) and the one it was applied on (nil: the empty state).
    public var version: Int?
    public var parent: Int?
    public var stateSHA256: String?
    public var baseModelSHA256: String?
    public var editorSHA256: String?
    public var time: String
    public var edits: Int
    /// Edits in the state after this batch (all batches so far on this line of versions).
    public var totalEdits: Int
    public var reliability: Double
    public var generality: Double?
    public var locality: Double?
    /// Per edit: reliability, generality, locality, and the greedy answers before (unedited model) and after.
    public var perEdit: [EditEvaluation.PerEdit]
    public var retention: RetentionResult?
    /// The watch list's facts (`watch --watch-list`), each scored before and after the batch.
    public var watchList: [FactScore]?
    public var canary: CanaryResult
    /// Nil when there is no held-out text.
    public var perplexity: PerplexityResult?
    /// Nil when fluency is not measured (`fluency_tokens` 0).
    public var fluency: FluencyResult?
    public var guardResult: GuardResult
    public var timings: StageTimes
    /// The earlier edits this batch replaced (edits of the same prompts made by earlier batches, with
    /// their old targets); absent when none.
    public var superseded: [SupersededEdit]? = nil

    enum CodingKeys: String, CodingKey {
        case format, batch, sha256, status, version, parent, time, edits, reliability, generality, locality, retention, canary
        case perplexity, fluency, timings, superseded
        case stateSHA256 = "state_sha256", baseModelSHA256 = "base_model_sha256", editorSHA256 = "editor_sha256"
        case totalEdits = "total_edits", perEdit = "per_edit", guardResult = "guard", watchList = "watch_list"
    }

    public func encoded() throws -> Data { try PipelineJSON.pretty(self) }

    /// The line this batch adds to `evaluations/batches.jsonl`.
    public var historyLine: HistoryLine {
        HistoryLine(time: time, batch: batch, sha256: sha256, status: status, version: version, parent: parent, edits: edits,
                    totalEdits: totalEdits, reliability: reliability, generality: generality, locality: locality,
                    retention: retention?.after, canaryLocality: canary.locality, perplexityUnedited: perplexity?.unedited,
                    perplexityBefore: perplexity?.before, perplexityAfter: perplexity?.after, fluency: fluency?.after, seconds: timings.total,
                    evaluation: version.map { BatchReport.fileName(batch: batch, version: $0) },
                    watch: watchList)
    }

    /// `NAME.vNNNN.json` for batch `NAME.jsonl` and version NNNN (at least 4 digits).
    public static func fileName(batch: String, version: Int) -> String {
        let stem = batch.hasSuffix(Inbox.batchExtension) ? String(batch.dropLast(Inbox.batchExtension.count)) : batch
        return stem + String(format: ".v%04d.json", version)
    }
}

/// One line of `STORE/evaluations/batches.jsonl`: a batch's means, in processing order.
public struct HistoryLine: Codable, Sendable, Equatable {
    public var time: String
    public var batch: String
    public var sha256: String
    public var status: BatchOutcome.Status
    public var version: Int?
    public var parent: Int?
    public var edits: Int
    public var totalEdits: Int
    public var reliability: Double
    public var generality: Double?
    public var locality: Double?
    public var retention: Double?
    public var canaryLocality: Double?
    public var perplexityUnedited: Double?
    public var perplexityBefore: Double?
    public var perplexityAfter: Double?
    /// The batch's fluency after it (nil when not measured).
    public var fluency: Double?
    public var seconds: Double
    /// The evaluation file's name in `evaluations/`.
    public var evaluation: String?
    /// The watch list's facts before and after the batch (nil without a watch list).
    public var watch: [FactScore]?

    enum CodingKeys: String, CodingKey {
        case time, batch, sha256, status, version, parent, edits, reliability, generality, locality, retention, seconds, evaluation, watch
        case fluency, totalEdits = "total_edits", canaryLocality = "canary_locality", perplexityUnedited = "perplexity_unedited"
        case perplexityBefore = "perplexity_before", perplexityAfter = "perplexity_after"
    }
}

/// A fact (an earlier edit sampled for retention, or a watch-list line) scored like reliability — the
/// share of `target_new`'s tokens the model predicts — before and after a batch.
public struct FactScore: Codable, Sendable, Equatable {
    public var prompt: String
    public var targetNew: String
    public var before: Double
    public var after: Double
    /// Every answer token predicted after the batch.
    public var holds: Bool { after >= 1 }

    enum CodingKeys: String, CodingKey { case prompt, targetNew = "target_new", before, after }

    /// The scores of `facts` from the model's predictions before and after, in order.
    static func scores(_ facts: [EditRequest], before: ArraySlice<TargetPrediction>, after: ArraySlice<TargetPrediction>) -> [FactScore] {
        zip(facts, zip(before, after)).map { FactScore(prompt: $0.prompt, targetNew: $0.targetNew, before: $1.0.accuracy, after: $1.1.accuracy) }
    }
}

/// One line of `STORE/evaluations/journal.jsonl`: what happened to each batch, keyed by its SHA-256.
public struct JournalEntry: Codable, Sendable, Equatable {
    public var time: String
    public var batch: String
    public var sha256: String
    public var status: BatchOutcome.Status
    public var version: Int?
    public var note: String?
}

/// `failed/NAME.error.json`: why a batch was rejected. Validation errors name the line (1-based; 0 for
/// the whole file), the field and the reason; a guarded batch carries its evaluation.
/// The stages a batch goes through, in order (the README's "a batch, start to end"); an error file names
/// the one that refused it (`validation`, `apply`, `evaluate` or `guard`).
public enum BatchStage: String, Codable, Sendable, CaseIterable {
    /// Claimed into `processing/`, read, hashed, parsed and checked against the model.
    case validation
    /// HEAD's state and edit log loaded and installed; the "before" measurements taken on it.
    case load
    /// The editor applies the batch to HEAD's state.
    case apply
    /// The edited model measured: the batch's metrics, retention, the watch list, canaries, perplexity, fluency.
    case evaluate
    /// The collapse guard's verdict on the evaluation.
    case `guard`
    /// The new version committed (started again from the new HEAD if HEAD moved meanwhile).
    case commit
    /// Evaluation file, batch-log and journal lines, the move to `done/`.
    case finish
}

public struct BatchErrorFile: Codable, Sendable {
    public static let currentFormat = "dafnet-batch-error/1"

    public var format = BatchErrorFile.currentFormat
    public var batch: String
    public var sha256: String
    public var stage: BatchStage
    public var line: Int
    public var field: String
    public var reason: String
    public var time: String
    /// HEAD when the batch was rejected (unchanged by it).
    public var head: Int?
    public var evaluation: BatchReport?

    public func encoded() throws -> Data { try PipelineJSON.pretty(self) }
}
