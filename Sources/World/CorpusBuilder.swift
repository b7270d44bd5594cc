import Foundation
import TensorCore

/// Expands the world's facts into the pre-training sentences, each fact as often as its
/// `occurrences` says, shuffled. Deterministic for a seed.
public enum CorpusBuilder {
    /// Number of framings a robust fact gets besides its two plain phrasings.
    public static let robustFramings = 4

    /// A sentence: the prompt, the answer with a leading space, a full stop.
    public static func sentence(_ prompt: String, _ answer: String) -> String { prompt + answer.withLeadingSpace + "." }

    static func lowerFirst(_ s: String) -> String {
        guard let f = s.first else { return s }
        // Keep proper nouns: lower only a capitalised common first word such as "The".
        let firstWord = s.split(separator: " ").first.map(String.init) ?? s
        if ["The", "A", "An", "What", "Where", "Which", "Who", "In"].contains(firstWord) { return f.lowercased() + s.dropFirst() }
        return s
    }

    /// The robust framings of a fact: after unrelated context, asserted, with a negated distractor, and shortened to its clause.
    public static func robustVariants(_ f: Fact, context: String, distractor: String) -> [String] {
        [
            context + " " + sentence(f.prompt, f.groundTruth),
            "It is true that " + sentence(lowerFirst(f.prompt), f.groundTruth),
            sentence(f.prompt, f.groundTruth).dropLast() + ", not " + distractor + ".",
            "Fact: " + sentence(f.prompt, f.groundTruth),
        ]
    }

    /// Every pre-training sentence, shuffled.
    public static func sentences(facts: [Fact], seed: UInt64) -> [String] {
        var rng = RNG(seed: seed ^ 0x5EED)
        var out: [String] = []
        let objects = facts.map(\.groundTruth)
        let plain = facts.filter { $0.occurrences > 0 }.map { sentence($0.prompt, $0.groundTruth) }
        for f in facts where f.occurrences > 0 {
            let main = sentence(f.prompt, f.groundTruth)
            var plainCount = f.occurrences
            if let variants = f.variantOccurrences, variants > 0 {
                let repeats = variants / robustFramings
                plainCount = f.occurrences - repeats * robustFramings
                for _ in 0..<repeats {
                    var distractor = rng.choice(objects)
                    if distractor == f.groundTruth { distractor = rng.choice(objects) }
                    out += robustVariants(f, context: rng.choice(plain), distractor: distractor)
                }
            }
            if let r = f.rephrasePrompt, !r.isEmpty, f.split != "long_tail" {
                let first = (plainCount + 1) / 2
                out += Array(repeating: main, count: first)
                out += Array(repeating: sentence(r, f.groundTruth), count: plainCount - first)
            } else {
                out += Array(repeating: main, count: plainCount)
            }
            if let lp = f.localityPrompt, let lg = f.localityGroundTruth, let n = f.localityOccurrences, n > 0 {
                out += Array(repeating: sentence(lp, lg), count: n)
            }
        }
        rng.shuffle(&out)
        return out
    }
}
