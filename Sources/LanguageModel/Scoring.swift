import Foundation
import TensorCore
import Tokenizers

/// A prompt and the answer to score after it, tokenized the way the official DAFNet code and EasyEdit
/// do: the answer gets a leading space if it has none; the answer's tokens are those of
/// `prompt + answer` after the prompt's own tokens.
public struct ScoredPrompt: Sendable {
    public let promptIds: [Int]
    public let targetIds: [Int]

    public init(promptIds: [Int], targetIds: [Int]) {
        self.promptIds = promptIds
        self.targetIds = targetIds
    }

    public init(prompt: String, target: String, tokenizer: Tokenizer) {
        let p = tokenizer.encode(prompt)
        let t = target.hasPrefix(" ") ? target : " " + target
        let full = tokenizer.encode(prompt + t)
        // Tokens of the full text after the prompt's own tokens (the prompt's tokenization is a prefix
        // for byte-level BPE when the answer starts with a space).
        let common = zip(p, full).prefix { $0 == $1 }.count
        promptIds = Array(full.prefix(common))
        targetIds = Array(full.dropFirst(common))
    }

    /// Inputs (prompt + answer without its last token) and where the answer's predictions sit.
    var inputIds: [Int] { promptIds + targetIds.dropLast() }
}

/// Teacher-forced predictions at the answer positions.
public struct TargetPrediction: Sendable, Codable, Equatable {
    /// Argmax token at each answer position, given the prompt and the earlier answer tokens.
    public var argmax: [Int]
    /// The answer tokens.
    public var target: [Int]
    /// Σ −log p(answer token).
    public var nll: Double

    /// Share of answer tokens the argmax gets right.
    public var accuracy: Double {
        target.isEmpty ? 0 : Double(zip(argmax, target).filter { $0 == $1 }.count) / Double(target.count)
    }
    public var firstTokenCorrect: Bool { argmax.first == target.first && !target.isEmpty }

    /// Share of positions where this prediction's argmax equals another's (locality).
    public func agreement(with other: TargetPrediction) -> Double {
        argmax.isEmpty ? 0 : Double(zip(argmax, other.argmax).filter { $0 == $1 }.count) / Double(argmax.count)
    }
}

extension TransformerLM {
    /// Teacher-forced argmax and NLL at the answer positions of each item, in batches (right padding).
    public func predict(_ items: [ScoredPrompt], batchSize: Int = 32) -> [TargetPrediction] {
        var out: [TargetPrediction] = []
        out.reserveCapacity(items.count)
        var start = 0
        while start < items.count {
            let chunk = Array(items[start..<min(start + batchSize, items.count)])
            start += chunk.count
            let inputs = chunk.map { Array($0.inputIds.suffix(spec.maxPositions)) }
            let batch = TokenBatch(rightPadded: inputs)
            let logits = forward(batch)
            let V = spec.vocabSize
            for (b, item) in chunk.enumerated() {
                let len = inputs[b].count
                let n = item.targetIds.count
                var argmax: [Int] = []
                var nll = 0.0
                for (j, target) in item.targetIds.enumerated() {
                    let pos = len - n + j
                    guard pos >= 0 else { argmax.append(-1); continue }
                    let row = logits.data + (b * batch.T + pos) * V
                    var best = 0
                    var mx = row[0]
                    for v in 1..<V where row[v] > mx { mx = row[v]; best = v }
                    var s: Double = 0
                    for v in 0..<V { s += Double(expf(row[v] - mx)) }
                    nll += Double(mx) + log(s) - Double(row[target])
                    argmax.append(best)
                }
                out.append(TargetPrediction(argmax: argmax, target: item.targetIds, nll: nll))
            }
        }
        return out
    }

    /// exp of the mean token negative log-likelihood over the texts (every token after the first).
    public func perplexity(_ texts: [[Int]], batchSize: Int = 32) -> Double {
        var nll = 0.0, count = 0.0
        var start = 0
        while start < texts.count {
            let chunk = texts[start..<min(start + batchSize, texts.count)].map { Array($0.prefix(spec.maxPositions)) }.filter { $0.count > 1 }
            start += batchSize
            if chunk.isEmpty { continue }
            let batch = TokenBatch(rightPadded: chunk.map { Array($0.dropLast()) })
            let logits = forward(batch)
            var labels = [Int32](repeating: -1, count: batch.B * batch.T)
            for (b, s) in chunk.enumerated() { for t in 0..<(s.count - 1) { labels[b * batch.T + t] = Int32(s[t + 1]) } }
            let (sum, m) = Kernels.crossEntropy(losses: nil, dlogits: nil, logits: logits.data, labels: labels, mask: nil,
                                                N: batch.B * batch.T, V: spec.vocabSize)
            nll += Double(sum); count += Double(m)
        }
        return count > 0 ? exp(nll / count) : .nan
    }
}
