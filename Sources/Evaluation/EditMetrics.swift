import Editing
import Foundation
import LanguageModel
import Tokenizers
import TensorCore

/// What a sequence of edits did, per edit and on average: teacher-forced token accuracy of the new target
/// on the edit prompt (reliability) and its rephrasings (generality), agreement of the edited model's
/// argmax with the unedited model's on unrelated facts (locality), and held-out perplexity.
public struct EditEvaluation: Codable, Sendable {
    public init(edits: [PerEdit], reliability: Double, generality: Double?, locality: Double?) {
        self.edits = edits; self.reliability = reliability; self.generality = generality; self.locality = locality
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        edits = try c.decode([PerEdit].self, forKey: .edits); reliability = try c.decode(Double.self, forKey: .reliability)
        generality = try c.decodeIfPresent(Double.self, forKey: .generality); locality = try c.decodeIfPresent(Double.self, forKey: .locality)
        perplexityBefore = try c.decodeIfPresent(Double.self, forKey: .perplexityBefore)
        perplexityAfter = try c.decodeIfPresent(Double.self, forKey: .perplexityAfter)
    }

    public struct PerEdit: Codable, Sendable {
        public var prompt: String
        public var targetNew: String
        public var reliability: Double
        public var generality: Double?
        public var locality: Double?
        /// Greedy answers to the edit prompt before and after (a few tokens).
        public var answerBefore: String?
        public var answerAfter: String?

        enum CodingKeys: String, CodingKey {
            case prompt, targetNew = "target_new", reliability, generality, locality
            case answerBefore = "answer_before", answerAfter = "answer_after"
        }
    }

    public var edits: [PerEdit]
    public var reliability: Double
    public var generality: Double?
    public var locality: Double?
    public var perplexityBefore: Double?
    public var perplexityAfter: Double?
    public var perplexityRatio: Double? {
        guard let a = perplexityAfter, let b = perplexityBefore, b > 0 else { return nil }
        return a / b
    }

    enum CodingKeys: String, CodingKey {
        case edits, reliability, generality, locality
        case perplexityBefore = "perplexity_before", perplexityAfter = "perplexity_after", perplexityRatio = "perplexity_ratio"
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(edits, forKey: .edits); try c.encode(reliability, forKey: .reliability)
        try c.encodeIfPresent(generality, forKey: .generality); try c.encodeIfPresent(locality, forKey: .locality)
        try c.encodeIfPresent(perplexityBefore, forKey: .perplexityBefore); try c.encodeIfPresent(perplexityAfter, forKey: .perplexityAfter)
        try c.encodeIfPresent(perplexityRatio, forKey: .perplexityRatio)
    }
}

public enum EditMetrics {
    /// The generated answer of a greedy continuation: the tokens after the prompt, up to end-of-text
    /// (not included).
    public static func answerTokens(_ generated: [Int], promptCount: Int, eos: Int?) -> [Int] {
        Array(generated.dropFirst(promptCount).prefix { $0 != eos })
    }

    /// The model's greedy answer to `prompt` (at most `maxTokens`, stopping at end-of-text), as text.
    public static func greedyAnswer(_ model: TransformerLM, _ tokenizer: Tokenizer, prompt: String, maxTokens: Int) throws -> String {
        tokenizer.decode(try greedyAnswerTokens(model, tokenizer, promptIds: tokenizer.encode(prompt), maxTokens: maxTokens))
    }

    /// The same as token ids, from the prompt's ids.
    public static func greedyAnswerTokens(_ model: TransformerLM, _ tokenizer: Tokenizer, promptIds: [Int], maxTokens: Int) throws -> [Int] {
        let eos = tokenizer.eosTokenID
        return answerTokens(try model.generateGreedy(prompt: promptIds, maxNewTokens: maxTokens, stop: eos), promptCount: promptIds.count, eos: eos)
    }

    static func mean(_ xs: [Double]) -> Double? { xs.isEmpty ? nil : xs.reduce(0, +) / Double(xs.count) }

    /// The unedited model's locality predictions for `requests` (computed before editing; pass to `evaluate`).
    public static func localityReference(editor: SequentialEditor, _ requests: [EditRequest]) -> [[TargetPrediction]] {
        let model = editor.model
        return model.withoutEdits {
            let items = requests.map { $0.locality.map { editor.scored($0.prompt, $0.groundTruth) } }
            let flat = model.predict(items.flatMap { $0 })
            var out: [[TargetPrediction]] = []
            var at = 0
            for it in items { out.append(Array(flat[at..<(at + it.count)])); at += it.count }
            return out
        }
    }

    /// Scores the model as it is now (edited) on `requests`. `answers` adds greedy answers before/after.
    public static func evaluate(editor: SequentialEditor, _ requests: [EditRequest], localityReference: [[TargetPrediction]],
                                heldoutText: [[Int]]? = nil, answers: Bool = false, answerTokens: Int = 4) throws -> EditEvaluation {
        let model = editor.model
        let rel = model.predict(requests.map { editor.scored($0.prompt, $0.targetNew) })
        let genItems = requests.map { r in r.rephrases.map { editor.scored($0, r.targetNew) } }
        let genFlat = model.predict(genItems.flatMap { $0 })
        let locItems = requests.map { $0.locality.map { editor.scored($0.prompt, $0.groundTruth) } }
        let locFlat = model.predict(locItems.flatMap { $0 })
        var edits: [EditEvaluation.PerEdit] = []
        var g = 0, l = 0
        for (i, r) in requests.enumerated() {
            let gens = genFlat[g..<(g + genItems[i].count)].map(\.accuracy)
            g += genItems[i].count
            let locs = zip(locFlat[l..<(l + locItems[i].count)], localityReference[i]).map { $0.agreement(with: $1) }
            l += locItems[i].count
            var e = EditEvaluation.PerEdit(prompt: r.prompt, targetNew: r.targetNew, reliability: rel[i].accuracy,
                                           generality: mean(gens), locality: mean(locs))
            if answers {
                e.answerAfter = try greedyAnswer(model, editor.tokenizer, prompt: r.prompt, maxTokens: answerTokens)
                e.answerBefore = try model.withoutEdits { try greedyAnswer(model, editor.tokenizer, prompt: r.prompt, maxTokens: answerTokens) }
            }
            edits.append(e)
        }
        var result = EditEvaluation(edits: edits, reliability: mean(edits.map(\.reliability)) ?? 0,
                                    generality: mean(edits.compactMap(\.generality)), locality: mean(edits.compactMap(\.locality)))
        if let text = heldoutText {
            result.perplexityAfter = model.perplexity(text)
            result.perplexityBefore = model.withoutEdits { model.perplexity(text) }
        }
        return result
    }
}
