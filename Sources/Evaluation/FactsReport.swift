import Foundation
import LanguageModel
import Tokenizers
import World

/// What the model knows: teacher-forced top-1 accuracy on the facts' answer tokens by DAFSet split and
/// phrasing, and perplexity on held-out text.
public struct FactsReport: Codable, Sendable {
    public struct Row: Codable, Sendable {
        public var split: String
        /// `prompt`, `rephrase`, a robust framing, or `neighbour` (the locality facts of held-out edits).
        public var phrasing: String
        public var facts: Int
        /// Mean over facts of the share of answer tokens predicted top-1.
        public var tokenAccuracy: Double
        /// Share of facts whose first answer token is the top-1 prediction.
        public var firstTokenAccuracy: Double
        /// Mean occurrences of these facts in the pre-training corpus.
        public var meanOccurrences: Double

        enum CodingKeys: String, CodingKey {
            case split, phrasing, facts, tokenAccuracy = "token_accuracy", firstTokenAccuracy = "first_token_accuracy"
            case meanOccurrences = "mean_occurrences"
        }
    }

    public var model: String
    public var rows: [Row]
    public var perplexity: Double
    public var perplexitySentences: Int

    public static func measure(model: TransformerLM, tokenizer: Tokenizer, facts: [Fact], heldoutText: [String],
                               modelName: String, limitPerSplit: Int? = nil) -> FactsReport {
        var rows: [Row] = []
        func score(_ split: String, _ phrasing: String, _ items: [(prompt: String, answer: String, occ: Int)]) {
            let chosen = limitPerSplit.map { Array(items.prefix($0)) } ?? items
            guard !chosen.isEmpty else { return }
            let preds = model.predict(chosen.map { ScoredPrompt(prompt: $0.prompt, target: $0.answer, tokenizer: tokenizer) })
            rows.append(Row(split: split, phrasing: phrasing, facts: preds.count,
                            tokenAccuracy: preds.map(\.accuracy).reduce(0, +) / Double(preds.count),
                            firstTokenAccuracy: Double(preds.filter(\.firstTokenCorrect).count) / Double(preds.count),
                            meanOccurrences: Double(chosen.map(\.occ).reduce(0, +)) / Double(chosen.count)))
        }
        for split in Fact.splits {
            let fs = facts.filter { $0.split == split }
            score(split, "prompt", fs.map { ($0.prompt, $0.groundTruth, $0.occurrences) })
            if split != "long_tail" {
                score(split, "rephrase", fs.compactMap { f in f.rephrasePrompt.map { ($0, f.groundTruth, f.occurrences) } })
            }
            if split == "robust" {
                // The framings the corpus used, with fresh context and distractors.
                let plain = facts.filter { $0.split == "popular" }.map { CorpusBuilder.sentence($0.prompt, $0.groundTruth) }
                let names = ["after-context", "asserted", "negated-distractor", "labelled"]
                for (k, name) in names.enumerated() where k != 2 {
                    let items = fs.enumerated().map { (i, f) -> (String, String, Int) in
                        let v = CorpusBuilder.robustVariants(f, context: plain[i % max(plain.count, 1)], distractor: "")[k]
                        // Score the answer after the framing's prompt part.
                        let full = v.dropLast()  // drop the final "."
                        let prompt = String(full.dropLast(f.groundTruth.count + 1))
                        return (prompt, f.groundTruth, f.occurrences)
                    }
                    score(split, name, items)
                }
            }
            if split == "heldout" {
                score(split, "neighbour", fs.compactMap { f in
                    guard let p = f.localityPrompt, let a = f.localityGroundTruth else { return nil }
                    return (p, a, f.localityOccurrences ?? 0)
                })
            }
        }
        let ppl = model.perplexity(heldoutText.map { tokenizer.encode($0) })
        return FactsReport(model: modelName, rows: rows, perplexity: ppl, perplexitySentences: heldoutText.count)
    }

    public func table() -> String {
        var lines = ["split       phrasing            facts   token acc   first-token acc   mean occurrences"]
        for r in rows {
            lines.append(r.split.padding(toLength: 12, withPad: " ", startingAt: 0) + r.phrasing.padding(toLength: 18, withPad: " ", startingAt: 0)
                         + String(format: "%7d   %9.3f   %15.3f   %16.1f", r.facts, r.tokenAccuracy, r.firstTokenAccuracy, r.meanOccurrences))
        }
        lines.append(String(format: "held-out perplexity: %.2f over %d sentences", perplexity, perplexitySentences))
        return lines.joined(separator: "\n")
    }
}
