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
        fluencyBefore = try c.decodeIfPresent(Double.self, forKey: .fluencyBefore)
        fluencyAfter = try c.decodeIfPresent(Double.self, forKey: .fluencyAfter)
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
        /// Fluency (`EditMetrics.ngramEntropy`) of a longer greedy continuation of the edit prompt, unedited
        /// and edited, and that edited continuation (for the sampled edits only).
        public var fluencyBefore: Double?
        public var fluencyAfter: Double?
        public var continuationAfter: String?

        enum CodingKeys: String, CodingKey {
            case prompt, targetNew = "target_new", reliability, generality, locality
            case answerBefore = "answer_before", answerAfter = "answer_after"
            case fluencyBefore = "fluency_before", fluencyAfter = "fluency_after", continuationAfter = "continuation_after"
        }
    }

    public var edits: [PerEdit]
    public var reliability: Double
    public var generality: Double?
    public var locality: Double?
    public var perplexityBefore: Double?
    public var perplexityAfter: Double?
    /// Mean fluency of the sampled edits' continuations, unedited and edited: a drop means the edited
    /// model repeats itself (ROME's and EasyEdit's generation-entropy check).
    public var fluencyBefore: Double?
    public var fluencyAfter: Double?
    public var perplexityRatio: Double? {
        guard let a = perplexityAfter, let b = perplexityBefore, b > 0 else { return nil }
        return a / b
    }

    enum CodingKeys: String, CodingKey {
        case edits, reliability, generality, locality
        case perplexityBefore = "perplexity_before", perplexityAfter = "perplexity_after", perplexityRatio = "perplexity_ratio"
        case fluencyBefore = "fluency_before", fluencyAfter = "fluency_after"
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(edits, forKey: .edits); try c.encode(reliability, forKey: .reliability)
        try c.encodeIfPresent(generality, forKey: .generality); try c.encodeIfPresent(locality, forKey: .locality)
        try c.encodeIfPresent(perplexityBefore, forKey: .perplexityBefore); try c.encodeIfPresent(perplexityAfter, forKey: .perplexityAfter)
        try c.encodeIfPresent(perplexityRatio, forKey: .perplexityRatio)
        try c.encodeIfPresent(fluencyBefore, forKey: .fluencyBefore); try c.encodeIfPresent(fluencyAfter, forKey: .fluencyAfter)
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
        try greedyAnswers(model, tokenizer, prompts: [prompt], maxTokens: maxTokens)[0]
    }

    /// The same for several prompts, decoded together (one batched, cached decode).
    public static func greedyAnswers(_ model: TransformerLM, _ tokenizer: Tokenizer, prompts: [String], maxTokens: Int) throws -> [String] {
        try greedyAnswerTokens(model, tokenizer, promptIds: prompts.map { tokenizer.encode($0) }, maxTokens: maxTokens).map { tokenizer.decode($0) }
    }

    /// Greedy answers as token ids, from the prompts' ids (one batched decode).
    public static func greedyAnswerTokens(_ model: TransformerLM, _ tokenizer: Tokenizer, promptIds: [[Int]], maxTokens: Int) throws -> [[Int]] {
        let eos = tokenizer.eosTokenID
        let generated = try model.generateGreedy(prompts: promptIds, maxNewTokens: maxTokens, stop: eos)
        return zip(promptIds, generated).map { answerTokens($1, promptCount: $0.count, eos: eos) }
    }

    /// `tokens` greedy tokens after each prompt by the edited and the unedited model (one decode),
    /// generated through end-of-text (`continuationText`), as ROME and EasyEdit generate for fluency.
    public static func greedyContinuationsEditedAndUnedited(_ model: TransformerLM, _ tokenizer: Tokenizer, prompts: [String],
                                                            tokens: Int) throws -> (edited: [String], unedited: [String]) {
        let ids = prompts.map { tokenizer.encode($0) }
        let g = try model.generateGreedyEditedAndUnedited(prompts: ids, maxNewTokens: tokens, stop: nil)
        func text(_ out: [[Int]]) -> [String] { zip(ids, out).map { continuationText(Array($1.dropFirst($0.count)), tokenizer) } }
        return (text(g.edited), text(g.unedited))
    }

    /// A fluency continuation's text: its tokens through end-of-text, each end-of-text left out and the pieces
    /// joined by a space (a model that stopped at the first end-of-text would give a one-word text whose
    /// n-gram entropy says nothing).
    static func continuationText(_ new: [Int], _ tokenizer: Tokenizer) -> String {
        guard let eos = tokenizer.eosTokenID else { return tokenizer.decode(new) }
        return new.split(separator: eos).map { tokenizer.decode(Array($0)).trimmingCharacters(in: .whitespaces) }.joined(separator: " ")
    }

    /// The answers (`answerTokens`, stopping at end-of-text) of every prompt when `answers`, and the
    /// `fluencyTokens`-token continuations of the prompts at `fluent`, by the edited and the unedited model, in
    /// one decode: a prompt with a continuation is decoded once, through end-of-text, and its answer is the
    /// continuation's start (a sequence's tokens do not depend on the others decoded with it).
    static func answersAndContinuations(_ model: TransformerLM, _ tokenizer: Tokenizer, prompts: [String], answers: Bool,
                                        answerTokens: Int, fluent: [Int], fluencyTokens: Int)
        throws -> (answers: [(after: String, before: String)?], continuations: [(after: String, before: String)?]) {
        let eos = tokenizer.eosTokenID, fluentSet = Set(fluent)
        let decoded = prompts.indices.filter { answers || fluentSet.contains($0) }
        let ids = decoded.map { tokenizer.encode(prompts[$0]) }
        let requests = zip(decoded, ids).map { i, p in
            fluentSet.contains(i) ? GreedyRequest(prompt: p, maxNewTokens: max(fluencyTokens, answers ? answerTokens : 0), stop: nil)
                : GreedyRequest(prompt: p, maxNewTokens: answerTokens, stop: eos)
        }
        let g = try model.generateGreedyEditedAndUnedited(requests)
        var answerTexts = [(after: String, before: String)?](repeating: nil, count: prompts.count)
        var continuations = answerTexts
        for (k, i) in decoded.enumerated() {
            let n = ids[k].count
            if answers {
                func answer(_ g: [Int]) -> String { tokenizer.decode(EditMetrics.answerTokens(Array(g.prefix(n + answerTokens)), promptCount: n, eos: eos)) }
                answerTexts[i] = (answer(g.edited[k]), answer(g.unedited[k]))
            }
            if fluentSet.contains(i) {
                func continuation(_ g: [Int]) -> String { continuationText(Array(g.dropFirst(n).prefix(fluencyTokens)), tokenizer) }
                continuations[i] = (continuation(g.edited[k]), continuation(g.unedited[k]))
            }
        }
        return (answerTexts, continuations)
    }

    static func mean(_ xs: [Double]) -> Double? { xs.isEmpty ? nil : xs.reduce(0, +) / Double(xs.count) }

    /// ROME's fluency measure, as EasyEdit reports it: the weighted n-gram entropy of a text in bits,
    /// mean(2/3·H₂, 4/3·H₃), where Hₙ is the entropy of the text's n-gram frequencies over word tokens (runs
    /// of letters and digits, and each other non-space character alone, close to nltk's `word_tokenize`).
    /// Repetitive text scores low; an empty n-gram list contributes 0.
    public static func ngramEntropy(_ text: String) -> Double {
        var words: [String] = []
        var current = ""
        for ch in text {
            if ch.isLetter || ch.isNumber || ch == "_" { current.append(ch); continue }
            if !current.isEmpty { words.append(current); current = "" }
            if !ch.isWhitespace { words.append(String(ch)) }
        }
        if !current.isEmpty { words.append(current) }
        func entropy(_ n: Int) -> Double {
            guard words.count >= n else { return 0 }
            var counts: [[String]: Int] = [:]
            for i in 0...(words.count - n) { counts[Array(words[i..<(i + n)]), default: 0] += 1 }
            let total = Double(words.count - n + 1)
            // Summed in a fixed order (the counts sorted): a dictionary's order changes from process to process
            // (Swift seeds its hashing per run), and so would the last bits of the sum.
            return counts.values.sorted().reduce(0.0) { h, c in let p = Double(c) / total; return h - p * Foundation.log2(p) }
        }
        return (2.0 / 3.0 * entropy(2) + 4.0 / 3.0 * entropy(3)) / 2
    }

    /// Which of `count` edits get the fluency check: all up to `sample`, else `sample` evenly spaced ones.
    public static func fluencyIndices(count: Int, sample: Int) -> [Int] {
        guard sample > 0 else { return [] }
        return count <= sample ? Array(0..<count) : (0..<sample).map { $0 * count / sample }
    }

    /// The unedited model's locality predictions for a batch (taken before editing; pass to `evaluate`),
    /// and the locality prompts' stream below the first edited block, which the edits leave as it is.
    public struct LocalityReference {
        public let predictions: [[TargetPrediction]]
        /// Per edit, its locality prompts with their answers, as scored.
        let items: [[ScoredPrompt]]
        let inputs: FixedSequences
    }

    /// Packed rows per chunk of the fixed texts scored again after each batch (held-out lines, canaries,
    /// locality prompts): with a routed editor only the chunks a key reaches are run again, so chunks are
    /// kept small enough that one routed line costs little, and large enough for full-speed products.
    public static let fixedChunkRows = 256

    public static func localityReference(editor: SequentialEditor, _ requests: [EditRequest]) throws -> LocalityReference {
        let model = editor.model
        let items = requests.map { $0.locality.map { editor.scored($0.prompt, $0.groundTruth) } }
        let flatItems = items.flatMap { $0 }
        let inputs = try model.fixedSequences(model.predictionInputs(flatItems), reuseBelow: editor.firstEditedBlock,
                                              rowsPerChunk: fixedChunkRows)
        let flat = model.withoutEdits { model.predict(flatItems, fixed: inputs) }
        var out: [[TargetPrediction]] = []
        var at = 0
        for it in items { out.append(Array(flat[at..<(at + it.count)])); at += it.count }
        return LocalityReference(predictions: out, items: items, inputs: inputs)
    }

    /// Scores the model as it is now (edited) on `requests`. `answers` adds greedy answers before/after.
    public static func evaluate(editor: SequentialEditor, _ requests: [EditRequest], localityReference: LocalityReference,
                                heldoutText: [[Int]]? = nil, answers: Bool = false, answerTokens: Int = 4,
                                fluencyTokens: Int = 0, fluencySample: Int = 8) throws -> EditEvaluation {
        let model = editor.model
        // The reliability and generality prompts through the model together (packed); the locality prompts from
        // the stream below the first edited block kept when their reference was taken.
        let relItems = requests.map { editor.scored($0.prompt, $0.targetNew) }
        let genItems = requests.map { r in r.rephrases.map { editor.scored($0, r.targetNew) } }
        let locItems = localityReference.items
        precondition(locItems.count == requests.count, "a locality reference of other edits")
        let genCount = genItems.reduce(0) { $0 + $1.count }
        let scored = model.predict(relItems + genItems.flatMap { $0 })
        let rel = Array(scored.prefix(relItems.count))
        let genFlat = Array(scored[relItems.count..<(relItems.count + genCount)])
        let locFlat = model.predict(locItems.flatMap { $0 }, fixed: localityReference.inputs)
        var edits: [EditEvaluation.PerEdit] = []
        var g = 0, l = 0
        for (i, r) in requests.enumerated() {
            let gens = genFlat[g..<(g + genItems[i].count)].map(\.accuracy)
            g += genItems[i].count
            let locs = zip(locFlat[l..<(l + locItems[i].count)], localityReference.predictions[i]).map { $0.agreement(with: $1) }
            l += locItems[i].count
            let e = EditEvaluation.PerEdit(prompt: r.prompt, targetNew: r.targetNew, reliability: rel[i].accuracy,
                                           generality: mean(gens), locality: mean(locs))
            edits.append(e)
        }
        if answers || fluencyTokens > 0 {
            let picked = fluencyTokens > 0 ? fluencyIndices(count: requests.count, sample: fluencySample) : []
            let prompts = requests.map(\.prompt)
            let g = try answersAndContinuations(model, editor.tokenizer, prompts: prompts, answers: answers,
                                                answerTokens: answerTokens, fluent: picked, fluencyTokens: fluencyTokens)
            for i in requests.indices {
                if let a = g.answers[i] { edits[i].answerAfter = a.after; edits[i].answerBefore = a.before }
                if let c = g.continuations[i] {
                    edits[i].continuationAfter = c.after
                    edits[i].fluencyAfter = ngramEntropy(prompts[i] + c.after)
                    edits[i].fluencyBefore = ngramEntropy(prompts[i] + c.before)
                }
            }
        }
        var result = EditEvaluation(edits: edits, reliability: mean(edits.map(\.reliability)) ?? 0,
                                    generality: mean(edits.compactMap(\.generality)), locality: mean(edits.compactMap(\.locality)))
        result.fluencyBefore = mean(edits.compactMap(\.fluencyBefore))
        result.fluencyAfter = mean(edits.compactMap(\.fluencyAfter))
        if let text = heldoutText {
            result.perplexityAfter = model.perplexity(text)
            result.perplexityBefore = model.withoutEdits { model.perplexity(text) }
        }
        return result
    }
}
