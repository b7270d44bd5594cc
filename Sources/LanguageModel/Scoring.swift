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

/// Fixed sequences scored again and again while the edits change (held-out text, canary prompts): packed
/// into chunks once, and the residual stream entering block `block` computed once on the unedited model.
/// While every edit sits in block `block` or later, the blocks below see what the unedited model saw, so
/// a scoring starts there (bit-identical to running every block: the same rows through the same kernels).
public final class FixedSequences: @unchecked Sendable {
    public let sequences: [[Int]]
    /// The first block whose input is not kept (0: nothing reused).
    public let block: Int
    let chunks: [Range<Int>]
    /// Per chunk, the stream entering `block` [rows, hidden] (empty when `block` is 0).
    let streams: [Tensor]

    init(sequences: [[Int]], block: Int, chunks: [Range<Int>], streams: [Tensor]) {
        self.sequences = sequences; self.block = block; self.chunks = chunks; self.streams = streams
    }
}

extension TransformerLM {
    /// Packed rows per forward of the scoring functions (bounds the activations' memory).
    static let scoringRows = 2048

    /// Consecutive runs of `sequences` of at most `scoringRows` rows (a longer sequence alone).
    static func chunks(_ sequences: [[Int]]) -> [Range<Int>] {
        var out: [Range<Int>] = []
        var start = 0, rows = 0
        for (i, s) in sequences.enumerated() {
            if rows > 0 && rows + s.count > scoringRows { out.append(start..<i); start = i; rows = 0 }
            rows += s.count
        }
        if start < sequences.count { out.append(start..<sequences.count) }
        return out
    }

    /// The lowest block with an edit switched on (a module with ΔW, Δb or output offsets), or `layers`.
    public var firstEditedBlock: Int {
        for l in 0..<spec.layers {
            for name in spec.linearModules(layer: l) {
                guard let m = linears[name] else { continue }
                if m.outputOffsets != nil || (m.editsEnabled && (m.deltaWeight != nil || m.deltaBias != nil)) { return l }
            }
        }
        return spec.layers
    }

    /// Prepares `sequences` (each 1…maxPositions tokens) for repeated scoring, keeping the unedited
    /// model's stream entering `block` (the first block an editor may change).
    public func fixedSequences(_ sequences: [[Int]], reuseBelow block: Int) throws -> FixedSequences {
        let block = max(0, min(block, spec.layers))
        let chunks = Self.chunks(sequences)
        let streams: [Tensor] = block == 0 ? [] : try withoutEdits {
            try chunks.map { c in
                let rows = try PackedRows(Array(sequences[c]), spec: spec)
                return rows.count == 0 ? Tensor(shape: [0, spec.hidden]) : run(rows, blocks: 0..<block).residual[block].copy()
            }
        }
        return FixedSequences(sequences: sequences, block: block, chunks: chunks, streams: streams)
    }

    /// The logits at `positions[i]` (indices into sequence i) of every sequence, a chunk of sequences at a
    /// time: `body(chunk, logits)` with the logits [Σ positions of the chunk, vocab] in order.
    func packedLogits(_ sequences: [[Int]], positions: [[Int]], fixed: FixedSequences? = nil,
                      body: (Range<Int>, Tensor) -> Void) {
        let reuse = fixed.map { $0.block > 0 && firstEditedBlock >= $0.block } ?? false
        let chunks = fixed?.chunks ?? Self.chunks(sequences)
        for (c, range) in chunks.enumerated() {
            // The sequences are the caller's own (tokenized and bounded by it): a bad one is a programming error.
            let rows = try! PackedRows(Array(sequences[range]), spec: spec)
            if rows.count == 0 { body(range, Tensor(shape: [0, spec.vocabSize])); continue }
            let a = reuse ? run(rows, blocks: fixed!.block..<spec.layers, input: fixed!.streams[c]) : run(rows, blocks: 0..<spec.layers)
            var picked: [Int] = []
            for (seg, i) in zip(rows.segments, range) { picked += positions[i].map { seg.row + $0 } }
            body(range, picked.isEmpty ? Tensor(shape: [0, spec.vocabSize]) : logits(a, rows: picked))
        }
    }

    /// Teacher-forced argmax and NLL at the answer positions of each item: the items packed without
    /// padding, logits only at the answer positions. `fixed`: the items' inputs prepared by
    /// `fixedSequences` (the same items, in order).
    public func predict(_ items: [ScoredPrompt], fixed: FixedSequences? = nil) -> [TargetPrediction] {
        let inputs = predictionInputs(items)
        precondition(fixed.map { $0.sequences == inputs } ?? true, "prepared sequences of other items")
        // Answer position j of an item sits at len − n + j of its input (negative: cut off by the context).
        let positions = zip(items, inputs).map { item, input in
            (0..<item.targetIds.count).map { input.count - item.targetIds.count + $0 }.filter { $0 >= 0 }
        }
        var out: [TargetPrediction] = []
        out.reserveCapacity(items.count)
        let V = spec.vocabSize
        packedLogits(inputs, positions: positions, fixed: fixed) { range, logits in
            var row = 0
            for i in range {
                let item = items[i]
                let missing = item.targetIds.count - positions[i].count
                var argmax = [Int](repeating: -1, count: missing)
                var nll = 0.0
                for target in item.targetIds.dropFirst(missing) {
                    let r = logits.data + row * V
                    row += 1
                    var best = 0
                    var mx = r[0]
                    for v in 1..<V where r[v] > mx { mx = r[v]; best = v }
                    var s: Double = 0
                    for v in 0..<V { s += Double(expf(r[v] - mx)) }
                    nll += Double(mx) + log(s) - Double(r[target])
                    argmax.append(best)
                }
                out.append(TargetPrediction(argmax: argmax, target: item.targetIds, nll: nll))
            }
        }
        return out
    }

    /// The inputs `predict` runs for `items`, for `fixedSequences`.
    public func predictionInputs(_ items: [ScoredPrompt]) -> [[Int]] {
        items.map { Array($0.inputIds.suffix(spec.maxPositions)) }
    }

    /// exp of the mean token negative log-likelihood over the texts (every token after the first), each
    /// text cut to the model's context. `fixed`: `perplexityInputs(texts)` prepared by `fixedSequences`.
    public func perplexity(_ texts: [[Int]], fixed: FixedSequences? = nil) -> Double {
        let (inputs, labels) = Self.perplexityInputs(texts, spec: spec)
        precondition(fixed.map { $0.sequences == inputs } ?? true, "prepared sequences of other texts")
        return perplexity(sequences: inputs, labels: labels, fixed: fixed)
    }

    /// What `perplexity` runs for `texts`: each text of 2 or more tokens (cut to the context) without its
    /// last token, and the next tokens as labels.
    public static func perplexityInputs(_ texts: [[Int]], spec: TransformerSpec) -> (inputs: [[Int]], labels: [[Int]]) {
        let kept = texts.map { Array($0.prefix(spec.maxPositions)) }.filter { $0.count > 1 }
        return (kept.map { Array($0.dropLast()) }, kept.map { Array($0.dropFirst()) })
    }

    private func perplexity(sequences: [[Int]], labels: [[Int]], fixed: FixedSequences?) -> Double {
        var nll = 0.0, count = 0.0
        packedLogits(sequences, positions: sequences.map { Array($0.indices) }, fixed: fixed) { range, logits in
            let flat = range.flatMap { labels[$0] }.map(Int32.init)
            let (sum, m) = Kernels.crossEntropy(losses: nil, dlogits: nil, logits: logits.data, labels: flat, mask: nil,
                                                N: flat.count, V: spec.vocabSize)
            nll += Double(sum); count += Double(m)
        }
        return count > 0 ? exp(nll / count) : .nan
    }
}
