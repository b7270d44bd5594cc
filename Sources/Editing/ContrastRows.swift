import Foundation
import LanguageModel
import TensorCore

/// Contrast keys for the `least_squares` solve. CounterFact-style neighbours share an edit's relation words
/// and differ in the subject, so the rows an edit writes at the relation's positions also fire for them.
/// Each edit's prompt is therefore also read with `contrast_subjects` other subjects in place of its own;
/// those prompts' module inputs enter `Σ uuᵀ` (scaled by √`contrast_weight`) with no value, asking the
/// module to keep its output there. What is left for ΔW to change is what tells the edit's subject apart.
/// The rows stay in the state, so they keep holding as later edits arrive.
extension DAFNetEditor {
    /// The file of an editor folder that lists the subjects contrast prompts draw from, one per line.
    public static let subjectsFile = "subjects.txt"

    /// The edit's prompt with its subject replaced by `contrast_subjects` others from `subjects`, chosen by a
    /// hash of the prompt (an edit always gets the same ones). None when the edit's prompt does not contain
    /// its subject.
    public func contrastPrompts(_ r: EditRequest) -> [String] {
        let k = config.contrastSubjects
        guard k > 0, let s = r.subject, !s.isEmpty, let range = r.prompt.range(of: s) else { return [] }
        let others = subjects.filter { $0 != s }
        guard !others.isEmpty else { return [] }
        var rng = RNG(seed: FNV1a.hash(r.prompt))
        var picked: [Int] = []
        while picked.count < min(k, others.count) {
            let i = rng.index(others.count)
            if !picked.contains(i) { picked.append(i) }
        }
        return picked.map { r.prompt.replacingCharacters(in: range, with: others[$0]) }
    }

    /// Per module, the input rows of every position of the edits' contrast prompts on the unedited model,
    /// scaled by √`contrast_weight` ([rows, in]); empty when there are none.
    public func contrastRows(_ requests: [EditRequest]) -> [String: Tensor] {
        let seqs = requests.flatMap(contrastPrompts).map { Array(tokenizer.encode($0).prefix(model.spec.maxPositions)) }.filter { !$0.isEmpty }
        guard !seqs.isEmpty else { return [:] }
        var parts: [String: [Tensor]] = [:]
        LeastSquares.forEachInputRows(model: model, sequences: seqs, modules: config.modules, batchSize: 64) { rows, _ in
            for (m, u) in rows { parts[m, default: []].append(u) }
        }
        let scale = config.contrastWeight.squareRoot()
        return parts.mapValues { ts in
            let out = Tensor.concatenatingRows(ts)
            if scale != 1 { out.scale(scale) }
            return out
        }
    }
}
