import Editing
import Foundation
import LanguageModel
import Tokenizers
import TensorCore
import World

/// DAFSet for the sample world: meta-training edits with the four properties (recent, popular, long-tail
/// — by corpus frequency and by the model's own likelihood of the object — and robust), and the
/// evaluation edits (the held-out facts), in the flat CounterFact layout, disjoint by construction.
public enum DAFSet {
    public struct Sets {
        public var train: [[String: Any]]
        public var eval: [[String: Any]]
    }

    /// `model` (optional) adds each fact's negative log-likelihood of its true object and marks the least
    /// likely quarter as long-tail by likelihood.
    public static func build(facts: [Fact], model: TransformerLM?, tokenizer: Tokenizer?, seed: UInt64 = 11) -> Sets {
        var nll: [Int: Double] = [:]
        if let model, let tokenizer {
            let idx = facts.indices.filter { facts[$0].split != "heldout" }
            let preds = model.predict(idx.map { ScoredPrompt(prompt: facts[$0].prompt, target: facts[$0].groundTruth, tokenizer: tokenizer) })
            for (i, p) in zip(idx, preds) { nll[i] = p.nll / Double(max(p.target.count, 1)) }
        }
        let threshold: Double? = nll.isEmpty ? nil : nll.values.sorted()[Int(Double(nll.count) * 0.75)]
        var plain: [String] = facts.filter { $0.split == "popular" }.map { CorpusBuilder.sentence($0.prompt, $0.groundTruth) }
        if plain.isEmpty { plain = ["The sky is blue."] }
        var train: [[String: Any]] = [], eval: [[String: Any]] = []
        for (i, f) in facts.enumerated() {
            guard let target = f.targetNew else { continue }
            var r: [String: Any] = ["prompt": f.prompt, "target_new": target, "ground_truth": f.groundTruth, "property": f.split,
                                    "occurrences": f.occurrences]
            if let c = f.caseId { r["case_id"] = c }
            if let s = f.subject { r["subject"] = s }
            var rephrases = f.rephrasePrompt.map { [$0] } ?? []
            if f.split == "robust" {
                // The same fact under added context, another length, positive and negated framings.
                rephrases += [plain[i % plain.count] + " " + f.prompt, "It is true that " + f.prompt,
                              "It is not true that " + f.prompt + " " + f.groundTruth + ". In fact, " + f.prompt]
            }
            if !rephrases.isEmpty { r["rephrase_prompt"] = rephrases }
            if let lp = f.localityPrompt, let lg = f.localityGroundTruth { r["locality_prompt"] = lp; r["locality_ground_truth"] = lg }
            if let v = nll[i] {
                r["model_nll"] = (v * 1000).rounded() / 1000
                r["long_tail_by_likelihood"] = v >= threshold!
            }
            if f.split == "heldout" { eval.append(r) } else { train.append(r) }
        }
        return Sets(train: train, eval: eval)
    }

    /// DAFSet from any CounterFact- or ZsRE-layout edits and any model: the model's own negative
    /// log-likelihood of each edit's true object (`ground_truth`, when given) marks the least likely quarter
    /// long-tail (`property` `long_tail`, else `popular`), every fourth edit (by a seeded draw) gets the robust
    /// rephrasings (added context, "It is true that", a negated framing) and `property` `robust`, and the
    /// edits are split into meta-training and evaluation by subject (`eval_share` of the subjects, drawn by a
    /// hash of the subject, so no subject is in both). Edits keep every field they came with.
    public static func build(edits: [EditRequest], model: TransformerLM?, tokenizer: Tokenizer?, evalShare: Double = 0.15,
                             seed: UInt64 = 11) throws -> Sets {
        var nll: [Int: Double] = [:]
        if let model, let tokenizer {
            let idx = edits.indices.filter { edits[$0].groundTruth.map { !$0.isEmpty } ?? false }
            for start in stride(from: 0, to: idx.count, by: 256) {
                let part = Array(idx[start..<min(start + 256, idx.count)])
                let preds = model.predict(part.map { ScoredPrompt(prompt: edits[$0].prompt, target: edits[$0].groundTruth!, tokenizer: tokenizer) })
                for (i, p) in zip(part, preds) { nll[i] = p.nll / Double(max(p.target.count, 1)) }
            }
        }
        let threshold: Double? = nll.isEmpty ? nil : nll.values.sorted()[Int(Double(nll.count) * 0.75)]
        var rng = RNG(seed: seed)
        let facts = edits.compactMap { r in r.groundTruth.map { r.prompt + " " + $0 + "." } }
        let context = facts.isEmpty ? ["The sky is blue."] : facts
        var train: [[String: Any]] = [], eval: [[String: Any]] = []
        for (i, e) in edits.enumerated() {
            var r = try JSONSerialization.jsonObject(with: JSONEncoder().encode(e)) as! [String: Any]
            var property = "popular"
            if let v = nll[i] {
                r["model_nll"] = (v * 1000).rounded() / 1000
                r["long_tail_by_likelihood"] = v >= threshold!
                if v >= threshold! { property = "long_tail" }
            }
            if rng.index(4) == 0, let gt = e.groundTruth {
                property = "robust"
                r["rephrase_prompt"] = e.rephrases + [context[rng.index(context.count)] + " " + e.prompt, "It is true that " + e.prompt,
                                                      "It is not true that " + e.prompt + " " + gt + ". In fact, " + e.prompt]
            }
            r["property"] = property
            let hash = FNV1a.hash(e.subject ?? e.prompt, basis: FNV1a().value ^ seed)
            if Double(hash % 10_000) / 10_000 < evalShare { eval.append(r) } else { train.append(r) }
        }
        return Sets(train: train, eval: eval)
    }

    public static func write(_ records: [[String: Any]], to url: URL) throws {
        var out = Data()
        for r in records {
            out.append(try JSONSerialization.data(withJSONObject: r, options: [.sortedKeys, .withoutEscapingSlashes]))
            out.append(UInt8(ascii: "\n"))
        }
        try out.write(to: url, options: .atomic)
    }
}

extension DAFSet {
    /// The same edits asking for another object: each edit's `target_new` becomes an object that the same
    /// relation phrasing (the prompt with its subject taken out) has elsewhere in `pool` (a ground truth or a
    /// target), neither the edit's own target nor its ground truth, picked deterministically from `seed`.
    /// Edits without a subject in the prompt, or whose phrasing has no other object, are left out. A check
    /// that an editor's numbers do not depend on CounterFact's particular counterfactual targets.
    public static func retarget(_ requests: [EditRequest], pool: [EditRequest], seed: UInt64 = 23) -> [EditRequest] {
        func template(_ r: EditRequest) -> String? {
            guard let s = r.subject, !s.isEmpty, r.prompt.contains(s) else { return nil }
            return r.prompt.replacingOccurrences(of: s, with: "{}")
        }
        var objects: [String: [String]] = [:]
        for r in pool + requests {
            guard let t = template(r) else { continue }
            for o in [r.groundTruth, r.targetNew].compactMap({ $0 }) where !(objects[t] ?? []).contains(o) { objects[t, default: []].append(o) }
        }
        var rng = RNG(seed: seed)
        var out: [EditRequest] = []
        for r in requests {
            guard let t = template(r) else { continue }
            let others = (objects[t] ?? []).filter { $0 != r.targetNew && $0 != r.groundTruth }.sorted()
            guard !others.isEmpty else { continue }
            var e = r
            e.targetNew = others[rng.index(others.count)]
            out.append(e)
        }
        return out
    }
}
