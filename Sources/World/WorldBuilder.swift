import Foundation
import TensorCore

/// How many facts of each kind the world holds and how often each occurs in pre-training.
public struct WorldOptions: Codable, Sendable, Equatable {
    public var seed: UInt64 = 2024
    /// Facts reserved for evaluation edits (from CounterFact eval): known to the model, never meta-trained on.
    public var heldout = 1200
    public var popular = 2000
    public var robust = 500
    public var longTail = 3000
    public var recent = 1500
    /// Ordinary held-out sentences for perplexity (unseen facts of CounterFact eval, both phrasings).
    public var perplexitySentences = 600
    /// Occurrences of each held-out fact (split evenly between its two phrasings).
    public var heldoutOccurrences = 120
    /// Popular facts draw a Zipf-like count between these bounds: max / rank^exponent.
    public var popularMin = 80
    public var popularMax = 300
    public var popularExponent = 0.6
    /// Robust facts: plain occurrences plus `robustVariants` framings × `robustVariantRepeats` each.
    public var robustOccurrences = 80
    public var robustVariantRepeats = 5
    /// Long-tail facts occur once or twice.
    public var longTailMax = 2
    /// Each held-out fact's neighbour (locality) fact occurs this often, so locality is measured on known facts.
    public var neighbourOccurrences = 30

    public init() {}

    enum CodingKeys: String, CodingKey {
        case seed, heldout, popular, robust, recent, longTail = "long_tail", perplexitySentences = "perplexity_sentences"
        case heldoutOccurrences = "heldout_occurrences", popularMin = "popular_min", popularMax = "popular_max"
        case popularExponent = "popular_exponent", robustOccurrences = "robust_occurrences"
        case robustVariantRepeats = "robust_variant_repeats", longTailMax = "long_tail_max"
        case neighbourOccurrences = "neighbour_occurrences"
    }
}

/// A CounterFact record as the data files hold it.
struct CounterFactRecord: Decodable {
    var case_id: Int?
    var prompt: String
    var target_new: String
    var subject: String?
    var ground_truth: String
    var rephrase_prompt: String?
    var locality_prompt: String?
    var locality_ground_truth: String?
}

/// Builds the world: picks facts from CounterFact into the DAFSet splits, decides their occurrence
/// counts, and keeps a held-out text for perplexity. Deterministic for a seed.
public enum WorldBuilder {
    public struct World: Sendable {
        public var facts: [Fact]
        public var perplexityText: [String]
    }

    static func readRecords(_ url: URL) throws -> [CounterFactRecord] {
        guard let data = FileManager.default.contents(atPath: url.path) else { throw WorldError.io("\(url.path): cannot read") }
        var out: [CounterFactRecord] = []
        var lineNo = 0
        for line in data.split(separator: UInt8(ascii: "\n")) {
            lineNo += 1
            do { out.append(try JSONDecoder().decode(CounterFactRecord.self, from: Data(line))) } catch {
                throw WorldError.badLine(file: url.path, line: lineNo, field: "(record)", reason: "\(error)")
            }
        }
        return out
    }

    public static func build(train: URL, eval: URL, options o: WorldOptions) throws -> World {
        var rng = RNG(seed: o.seed)
        var trainRecs = try readRecords(train)
        var evalRecs = try readRecords(eval)
        rng.shuffle(&trainRecs)
        rng.shuffle(&evalRecs)

        // Every question string (prompt, rephrase, neighbour prompt) belongs to one fact only, so that no two
        // facts teach different answers to the same words.
        var questions: Set<String> = []
        func usable(_ r: CounterFactRecord, needRephrase: Bool, needLocality: Bool) -> Bool {
            let words = [r.prompt, r.rephrase_prompt, r.locality_prompt].compactMap { $0?.trimmingCharacters(in: .whitespaces) }
            if r.prompt.isEmpty || r.ground_truth.isEmpty || r.target_new.isEmpty || r.ground_truth == r.target_new { return false }
            if needRephrase && (r.rephrase_prompt ?? "").isEmpty { return false }
            if needLocality && ((r.locality_prompt ?? "").isEmpty || (r.locality_ground_truth ?? "").isEmpty) { return false }
            if words.contains(where: questions.contains) || Set(words).count != words.count { return false }
            return true
        }
        func take(_ recs: inout [CounterFactRecord], _ n: Int, rephrase: Bool, locality: Bool) throws -> [CounterFactRecord] {
            var picked: [CounterFactRecord] = []
            var rest: [CounterFactRecord] = []
            for r in recs {
                if picked.count < n && usable(r, needRephrase: rephrase, needLocality: locality) {
                    picked.append(r)
                    for w in [r.prompt, r.rephrase_prompt, r.locality_prompt].compactMap({ $0 }) { questions.insert(w.trimmingCharacters(in: .whitespaces)) }
                } else {
                    rest.append(r)
                }
            }
            if picked.count < n { throw WorldError.notEnoughFacts(needed: n, available: picked.count) }
            recs = rest
            return picked
        }

        func fact(_ r: CounterFactRecord, _ split: String, _ occ: Int, source: String, neighbour: Int? = nil, variants: Int? = nil) -> Fact {
            Fact(caseId: r.case_id, prompt: r.prompt, targetNew: r.target_new, subject: r.subject, groundTruth: r.ground_truth,
                 rephrasePrompt: r.rephrase_prompt, localityPrompt: r.locality_prompt, localityGroundTruth: r.locality_ground_truth,
                 split: split, occurrences: occ, localityOccurrences: neighbour, variantOccurrences: variants, source: source)
        }

        var facts: [Fact] = []
        // Evaluation edits come from CounterFact eval; the meta-training splits from CounterFact train.
        for r in try take(&evalRecs, o.heldout, rephrase: true, locality: true) {
            facts.append(fact(r, "heldout", o.heldoutOccurrences, source: "eval", neighbour: o.neighbourOccurrences))
        }
        let popular = try take(&trainRecs, o.popular, rephrase: true, locality: false)
        for (rank, r) in popular.enumerated() {
            let z = Double(o.popularMax) / pow(Double(rank + 1), o.popularExponent)
            facts.append(fact(r, "popular", max(o.popularMin, min(o.popularMax, Int(z.rounded()))), source: "train"))
        }
        for r in try take(&trainRecs, o.robust, rephrase: true, locality: false) {
            let variants = CorpusBuilder.robustFramings * o.robustVariantRepeats
            facts.append(fact(r, "robust", o.robustOccurrences + variants, source: "train", variants: variants))
        }
        for r in try take(&trainRecs, o.longTail, rephrase: false, locality: false) {
            facts.append(fact(r, "long_tail", 1 + rng.index(max(o.longTailMax, 1)), source: "train"))
        }
        for r in try take(&trainRecs, o.recent, rephrase: true, locality: false) {
            facts.append(fact(r, "recent", 0, source: "train"))
        }
        // Held-out ordinary sentences: facts of the eval file that appear nowhere else.
        var text: [String] = []
        // One sentence per line: line breaks inside CounterFact prompts become spaces.
        func line(_ s: String) -> String { s.replacingOccurrences(of: "\r", with: " ").replacingOccurrences(of: "\n", with: " ") }
        for r in try take(&evalRecs, o.perplexitySentences / 2, rephrase: true, locality: false) {
            text.append(line(r.prompt + r.ground_truth.withLeadingSpace + "."))
            text.append(line(r.rephrase_prompt! + r.ground_truth.withLeadingSpace + "."))
        }
        return World(facts: facts, perplexityText: text)
    }
}
