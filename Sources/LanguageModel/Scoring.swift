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
///
/// With a router, a chunk none of whose rows reaches a key runs as the unedited model too (its rows never
/// see an edit), so the unedited model's results are kept per chunk the first time they are computed and
/// such a chunk is not run again (`TransformerLM.uneditedChunks`). One user at a time: the kept results
/// are filled in as the scorings run.
public final class FixedSequences: @unchecked Sendable {
    public let sequences: [[Int]]
    /// The first block whose input is not kept (0: nothing reused).
    public let block: Int
    let chunks: [Range<Int>]
    /// Per chunk, the stream entering `block` [rows, hidden] (empty when `block` is 0).
    let streams: [Tensor]
    /// Per router site (block, site), the stream the router reads on each chunk, unedited (on first use).
    var siteStreams: [Int: [Tensor]] = [:]
    /// Per chunk, the unedited model's summed next-token NLL and token count (`perplexity`), or its
    /// predictions (`predict`), kept once computed.
    var uneditedNLL: [Int: (nll: Double, count: Double, lastLabels: [Int])] = [:]
    var uneditedPredictions: [Int: [TargetPrediction]] = [:]

    init(sequences: [[Int]], block: Int, chunks: [Range<Int>], streams: [Tensor]) {
        self.sequences = sequences; self.block = block; self.chunks = chunks; self.streams = streams
    }

    /// How many chunks the sequences are scored in.
    public var chunkCount: Int { chunks.count }
}

extension TransformerLM {
    /// Packed rows per forward of the scoring functions (bounds the activations' memory).
    public static let scoringRows = 2048

    /// Consecutive runs of `sequences` of at most `rowsPerChunk` rows (a longer sequence alone).
    static func chunks(_ sequences: [[Int]], rowsPerChunk: Int = scoringRows) -> [Range<Int>] {
        var out: [Range<Int>] = []
        var start = 0, rows = 0
        for (i, s) in sequences.enumerated() {
            if rows > 0 && rows + s.count > rowsPerChunk { out.append(start..<i); start = i; rows = 0 }
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
                if m.outputOffsets != nil || m.isEdited { return l }
            }
        }
        return spec.layers
    }

    /// Prepares `sequences` (each 1…maxPositions tokens) for repeated scoring, keeping the unedited
    /// model's stream entering `block` (the first block an editor may change). `rowsPerChunk`: packed rows
    /// per forward (smaller chunks: less to run again where a router reaches one of their rows).
    public func fixedSequences(_ sequences: [[Int]], reuseBelow block: Int,
                               rowsPerChunk: Int = TransformerLM.scoringRows) throws -> FixedSequences {
        let block = max(0, min(block, spec.layers))
        let chunks = Self.chunks(sequences, rowsPerChunk: max(1, rowsPerChunk))
        let streams: [Tensor] = block == 0 ? [] : try withoutEdits {
            try chunks.map { c in
                let rows = try PackedRows(Array(sequences[c]), spec: spec)
                return rows.count == 0 ? Tensor(shape: [0, spec.hidden]) : run(rows, blocks: 0..<block).residual[block].copy()
            }
        }
        return FixedSequences(sequences: sequences, block: block, chunks: chunks, streams: streams)
    }

    /// Per chunk of `fixed`, whether the model as it is now computes it exactly as the unedited model
    /// does: no edit is switched on, or a router (with no output offsets anywhere) that no row of the
    /// chunk reaches, so that its rows never see an edit (the same rows through the same kernels).
    public func uneditedChunks(_ fixed: FixedSequences) -> [Bool] {
        let n = fixed.chunks.count
        if firstEditedBlock == spec.layers { return [Bool](repeating: true, count: n) }
        guard let router, !linears.values.contains(where: { $0.outputOffsets != nil }) else {
            return [Bool](repeating: false, count: n)
        }
        let key = router.layer * RouteSite.allCases.count + router.site.rawValue
        let streams: [Tensor]
        if let kept = fixed.siteStreams[key] {
            streams = kept
        } else {
            // The sequences were checked when `fixed` was made.
            streams = withoutEdits {
                fixed.chunks.map { c in
                    let rows = try! PackedRows(Array(fixed.sequences[c]), spec: spec)
                    guard rows.count > 0 else { return Tensor(shape: [0, spec.hidden]) }
                    let a = run(rows, blocks: 0..<(router.layer + 1))
                    return (router.site == .attentionInput ? a.ln1[router.layer] : a.ln2[router.layer]).copy()
                }
            }
            fixed.siteStreams[key] = streams
        }
        return streams.map { !router.matches($0.data, N: $0.shape[0]).contains(true) }
    }

    /// The logits at `positions[i]` (indices into sequence i) of every sequence, a chunk of sequences at a
    /// time: `body(chunk index, chunk, logits)` with the logits [Σ positions of the chunk, vocab] in order.
    /// Chunks that `skip` marks are not run.
    func packedLogits(_ sequences: [[Int]], positions: [[Int]], fixed: FixedSequences? = nil, skip: [Bool]? = nil,
                      body: (Int, Range<Int>, Tensor) -> Void) {
        let reuse = fixed.map { $0.block > 0 && firstEditedBlock >= $0.block } ?? false
        let chunks = fixed?.chunks ?? Self.chunks(sequences)
        for (c, range) in chunks.enumerated() where skip?[c] != true {
            // The sequences are the caller's own (tokenized and bounded by it): a bad one is a programming error.
            let rows = try! PackedRows(Array(sequences[range]), spec: spec)
            if rows.count == 0 { body(c, range, Tensor(shape: [0, spec.vocabSize])); continue }
            let a = reuse ? run(rows, blocks: fixed!.block..<spec.layers, input: fixed!.streams[c]) : run(rows, blocks: 0..<spec.layers)
            var picked: [Int] = []
            for (seg, i) in zip(rows.segments, range) { picked += positions[i].map { seg.row + $0 } }
            body(c, range, picked.isEmpty ? Tensor(shape: [0, spec.vocabSize]) : logits(a, rows: picked))
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
        let V = spec.vocabSize
        // Kept predictions are for these items only if their answers are these items' (the same inputs can
        // be scored against other answers).
        let same = { (range: Range<Int>, kept: [TargetPrediction]) in zip(range, kept).allSatisfy { items[$0].targetIds == $1.target } }
        return scoredChunks(inputs, positions: positions, fixed: fixed, kept: \.uneditedPredictions, usable: same) { range, logits in
            var out: [TargetPrediction] = []
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
            return out
        }.flatMap { $0 }
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
        // A kept sum is for these texts only if their last tokens are these (the inputs hold all the others).
        let lastLabels = { (range: Range<Int>) in range.map { labels[$0].last ?? -1 } }
        let parts = scoredChunks(sequences, positions: sequences.map { Array($0.indices) }, fixed: fixed, kept: \.uneditedNLL,
                                 usable: { range, kept in kept.lastLabels == lastLabels(range) }) { range, logits in
            let flat = range.flatMap { labels[$0] }.map(Int32.init)
            let (sum, m) = Kernels.crossEntropy(losses: nil, dlogits: nil, logits: logits.data, labels: flat, mask: nil,
                                                N: flat.count, V: spec.vocabSize)
            return (nll: Double(sum), count: Double(m), lastLabels: lastLabels(range))
        }
        var nll = 0.0, count = 0.0
        for p in parts { nll += p.nll; count += p.count }
        return count > 0 ? exp(nll / count) : .nan
    }

    /// `score(chunk, logits)` of each chunk, in order. With `fixed`, a chunk that the model computes as the
    /// unedited model (`uneditedChunks`) takes the unedited result kept in `fixed` at `kept` (when `usable`
    /// accepts it for the chunk's sequences), and one computed so is kept there.
    private func scoredChunks<R>(_ sequences: [[Int]], positions: [[Int]], fixed: FixedSequences?,
                                 kept: ReferenceWritableKeyPath<FixedSequences, [Int: R]>,
                                 usable: (Range<Int>, R) -> Bool = { _, _ in true },
                                 score: (Range<Int>, Tensor) -> R) -> [R] {
        let unedited = fixed.map(uneditedChunks)
        var out: [Int: R] = [:]
        if let fixed, let unedited {
            for (c, u) in unedited.enumerated() where u {
                if let r = fixed[keyPath: kept][c], usable(fixed.chunks[c], r) { out[c] = r }
            }
        }
        let count = fixed?.chunks.count ?? Self.chunks(sequences).count
        packedLogits(sequences, positions: positions, fixed: fixed, skip: (0..<count).map { out[$0] != nil }) { c, range, logits in
            let r = score(range, logits)
            out[c] = r
            if let fixed, unedited?[c] == true { fixed[keyPath: kept][c] = r }
        }
        return (0..<count).map { out[$0]! }
    }
}
