import Foundation
import Storage
import TensorCore

/// Sizes of the auxiliary network (the official `aux_model` configuration keys).
public struct AuxNetConfig: Codable, Sendable, Equatable {
    public var layerN = 2
    public var innerAttDim = 256
    public var ffnDim = 512
    public var outerAttDim = 256
    public var outerAttHeadN = 2
    public var outerScoreAttDim = 128
    public var outerScoreAttHeadN = 2
    /// Only the exact batch norm ("EBN") is implemented.
    public var normLayer = "EBN"

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case layerN = "layer_n", innerAttDim = "inner_att_dim", ffnDim = "ffn_dim", outerAttDim = "outer_att_dim"
        case outerAttHeadN = "outer_att_head_n", outerScoreAttDim = "outer_score_att_dim"
        case outerScoreAttHeadN = "outer_score_att_head_n", normLayer = "norm_layer"
    }
}

/// An exact running batch norm over every row ever seen (DAFNet's `ExactBatchNorm1d`): in training mode the
/// mean and unbiased variance are updated exactly with each batch; in evaluation mode they are fixed.
public struct ExactBatchNorm: Sendable {
    public var mean: Tensor
    public var variance: Tensor
    public var std: Tensor
    public var count: Int
    public var eps: Float

    public init(dim: Int, eps: Float = 1e-8) {
        mean = Tensor(shape: [dim]); variance = Tensor(shape: [dim]); std = Tensor(shape: [dim], repeating: 1)
        count = 0; self.eps = eps
    }

    /// Normalises rows x [N, dim]; with `training`, first folds the batch into the statistics. A first
    /// batch of one row only sets the mean and passes through unchanged, as the reference does.
    public mutating func forward(_ x: Tensor, training: Bool) -> Tensor {
        if training && fold(x) { return x.copy() }
        return normalise(x)
    }

    /// Folds rows x [N, dim] into the statistics exactly; true when they were a first batch of one row,
    /// which only sets the mean.
    @discardableResult
    public mutating func fold(_ x: Tensor) -> Bool {
        let d = mean.count, N = x.count / d
        guard count != 0 || N != 1 else {
            count = 1
            for j in 0..<d { mean[j] = x[j] }
            return true
        }
        let oldK = Double(count), newK = Double(count + N)
        for j in 0..<d {
            var s = 0.0
            for n in 0..<N { s += Double(x[n * d + j]) }
            let oldMean = Double(mean[j])
            let newMean = oldK / newK * oldMean + s / newK
            var sq = 0.0
            for n in 0..<N { let e = newMean - Double(x[n * d + j]); sq += e * e }
            let v = (oldK - 1) / (newK - 1) * Double(variance[j]) + oldK / (newK - 1) * (newMean - oldMean) * (newMean - oldMean)
                + sq / (newK - 1)
            mean[j] = Float(newMean); variance[j] = Float(v); std[j] = Float(v.squareRoot())
        }
        count += N
        return false
    }

    /// Rows x [N, dim] normalised by the current statistics.
    public func normalise(_ x: Tensor) -> Tensor {
        let d = mean.count, N = x.count / d
        let out = Tensor(shape: x.shape)
        for n in 0..<N { for j in 0..<d { out[n * d + j] = (x[n * d + j] - mean[j]) / (std[j] + eps) } }
        return out
    }
}

/// What one call of the auxiliary network produces for one module: its output rows split into the
/// input side `x1` and the value side `x2`, and the score attention's scales. How the rows become an
/// update is the accumulation rule's business (`products` is the paper's).
public struct AuxOutput {
    /// x1: the input-side rows [Σ lengths, xDim], on the tape.
    public let x1: Variable
    /// x2: the value-side rows [Σ lengths, deltaDim] before any scale, on the tape.
    public let values: Variable
    /// The decay of the accumulated past update: Π (1 − s_i), averaged over layers.
    public let pastUpdateScale: Float
    /// Per-edit update scales s_i · Π_{j>i}(1 − s_j), averaged over layers.
    public let updateScales: [Float]
    /// The per-edit scales spread over each edit's rows (scale / length), [Σ lengths].
    public let rowScales: [Float]
    /// The sequence representations after this call, per layer: [past + edits, dim] when the call was given
    /// the past's representations, else [edits, dim] (a past known only by its memo).
    public let newReps: [Tensor]

    /// The paper's update: ΔW_new = x1ᵀ · (scaled x2) [xDim, deltaDim] and Δb_new = Σ scaled x2 rows [deltaDim].
    public func products(tape: Tape) -> (deltaWeight: Variable, deltaBias: Variable) {
        let x2 = tape.rowScale(values, tape.leaf(Tensor(shape: [rowScales.count], values: rowScales)))
        return (tape.matmul(x1, x2, transA: true), tape.sumRows(x2))
    }
}

/// One module's share of a call of its network: its signal rows x [Σ lengths, xDim + deltaDim] (rows
/// `[u | δ]`), one segment per edit; its mode; the sequence's past representations (per layer, [past, dim];
/// nil for a fresh sequence, or at inference for a past the memo holds) and, at inference, the memo of the
/// past's projections: the call extends it with its edits unless `extendsMemo` is false (a look at what
/// edits would give, leaving the sequence as it is).
public struct AuxInput {
    public var x: Tensor
    public var lengths: [Int]
    public var mode: Int
    public var pastReps: [Tensor]?
    public var memo: PastProjections?
    public var extendsMemo: Bool

    public init(x: Tensor, lengths: [Int], mode: Int, pastReps: [Tensor]?, memo: PastProjections? = nil, extendsMemo: Bool = true) {
        self.x = x; self.lengths = lengths; self.mode = mode; self.pastReps = pastReps; self.memo = memo
        self.extendsMemo = extendsMemo
    }
}

/// Inference memo of a sequence's past: per layer, the inter-editing attention's keys and values and the
/// score attention's keys of every past representation, so that a new edit projects only its own rows
/// (without it each edit re-projects all N past rows: O(N) work per edit). Valid for one network and one
/// sequence; `rows` says how many past rows each layer's projections cover.
public final class PastProjections: @unchecked Sendable {
    public private(set) var keys: [Tensor?], values: [Tensor?], scoreKeys: [Tensor?]
    public private(set) var rows: [Int]

    public init(layers: Int) {
        keys = Array(repeating: nil, count: layers); values = keys; scoreKeys = keys
        rows = Array(repeating: -1, count: layers)
    }

    func set(_ l: Int, keys k: Tensor, values v: Tensor, scoreKeys sk: Tensor) {
        keys[l] = k; values[l] = v; scoreKeys[l] = sk; rows[l] = k.shape[0]
    }

    /// Every layer complete (a memo that can stand for its past's representations).
    public var isComplete: Bool { keys.allSatisfy { $0 != nil } && values.allSatisfy { $0 != nil } && scoreKeys.allSatisfy { $0 != nil } }

    /// A memo from stored projections: per layer its keys, values and score keys (each [rows, …]).
    public convenience init(keys: [Tensor], values: [Tensor], scoreKeys: [Tensor]) {
        self.init(layers: keys.count)
        for l in keys.indices { set(l, keys: keys[l], values: values[l], scoreKeys: scoreKeys[l]) }
    }

    /// A copy whose tensors are its own.
    public func copy() -> PastProjections {
        let c = PastProjections(layers: rows.count)
        c.keys = keys.map { $0?.copy() }; c.values = values.map { $0?.copy() }; c.scoreKeys = scoreKeys.map { $0?.copy() }
        c.rows = rows
        return c
    }
}

/// DAFNet's auxiliary network for one module shape (the official `GradientTransformer` and `DAFNetModel`),
/// parameters under the official names. One instance serves every edited module of its shape; a mode
/// embedding per module gives each its own scale and shift.
public final class AuxiliaryNetwork: @unchecked Sendable {
    public let xDim: Int
    public let deltaDim: Int
    public let modes: Int
    public let config: AuxNetConfig
    public var norm: ExactBatchNorm
    public let parameters: [Parameter]
    private let byName: [String: Parameter]

    public var dim: Int { xDim + deltaDim }

    public init(xDim: Int, deltaDim: Int, modes: Int, config: AuxNetConfig) {
        self.xDim = xDim; self.deltaDim = deltaDim; self.modes = modes; self.config = config
        norm = ExactBatchNorm(dim: xDim + deltaDim)
        let d = xDim + deltaDim
        var shapes: [(String, [Int])] = []
        for l in 0..<config.layerN {
            let p = "dafnet_model.layers.\(l)."
            func lin(_ n: String, _ inF: Int, _ outF: Int) { shapes += [(p + n + ".weight", [outF, inF]), (p + n + ".bias", [outF])] }
            lin("inner_att.trans1.0", d, config.innerAttDim); lin("inner_att.trans1.2", config.innerAttDim, d)
            lin("inner_att.trans2.0", d, config.innerAttDim); lin("inner_att.trans2.2", config.innerAttDim, 1)
            let oa = config.outerAttHeadN * config.outerAttDim
            lin("outer_att.lq", d, oa); lin("outer_att.lk", d, oa); lin("outer_att.lv", d, oa); lin("outer_att.lo", oa, d)
            let sa = config.outerScoreAttHeadN * config.outerScoreAttDim
            lin("outer_att_score.lq", d, sa); lin("outer_att_score.lk", d, sa)
            lin("feedforward.fc1", d, config.ffnDim); lin("feedforward.fc2", config.ffnDim, d)
            for k in 1...3 { shapes += [(p + "layer_norm\(k).weight", [d]), (p + "layer_norm\(k).bias", [d])] }
            shapes += [(p + "mode_shift.weight", [modes, d]), (p + "mode_scale.weight", [modes, d])]
        }
        parameters = shapes.map { Parameter(name: $0.0, value: Tensor(shape: $0.1)) }
        byName = Dictionary(uniqueKeysWithValues: parameters.map { ($0.name, $0) })
    }

    public func parameter(_ name: String) -> Parameter? { byName[name] }

    /// PyTorch's default initialisation (uniform ±1/√fan_in for linear layers), unit LayerNorms, mode
    /// scale 1 and shift 0 (the reference's choice).
    public func initialise(rng: inout RNG) {
        for p in parameters {
            if p.name.hasSuffix("mode_scale.weight") || (p.name.contains("layer_norm") && p.name.hasSuffix(".weight")) {
                p.value.fill(1)
            } else if p.name.hasSuffix("mode_shift.weight") || p.name.contains("layer_norm") {
                p.value.fill(0)
            } else {
                let weight = byName[p.name.hasSuffix(".bias") ? String(p.name.dropLast(5)) + ".weight" : p.name]!
                let bound = 1 / Float(weight.value.shape[1]).squareRoot()
                for i in 0..<p.value.count { p.value[i] = rng.uniform(-bound, bound) }
            }
        }
    }

    /// The state dict: parameters plus the batch-norm buffers (official names).
    public func stateTensors() -> [String: Tensor] {
        var out = Dictionary(uniqueKeysWithValues: parameters.map { ($0.name, $0.value) })
        out["norm_layer.mean"] = norm.mean; out["norm_layer.var"] = norm.variance; out["norm_layer.std"] = norm.std
        out["norm_layer.k"] = Tensor(shape: [], values: [Float(norm.count)])
        out["norm_layer.eps"] = Tensor(shape: [], values: [norm.eps])
        return out
    }

    /// Loads a state dict by official names (all parameters and the norm buffers must be present).
    public func load(_ source: TensorSource, prefix: String = "", file: String) throws {
        for p in parameters {
            let t = try source.tensor(prefix + p.name)
            guard t.count == p.value.count else {
                throw EditingError.shapeMismatch(name: prefix + p.name, expected: p.value.shape, found: t.shape, file: file)
            }
            p.value.assign(t)
        }
        norm.mean.assign(try source.tensor(prefix + "norm_layer.mean"))
        norm.variance.assign(try source.tensor(prefix + "norm_layer.var"))
        norm.std.assign(try source.tensor(prefix + "norm_layer.std"))
        norm.count = Int(try source.tensor(prefix + "norm_layer.k")[0])
        norm.eps = try source.tensor(prefix + "norm_layer.eps")[0]
    }

    // MARK: Forward

    /// Runs the network on the gradient signals of one module: x [Σ lengths, xDim + deltaDim] (rows
    /// `[u | δ]`), one segment per edit. `pastReps` (per layer, [past, dim]) continue a sequence; empty for
    /// a fresh one. `trainingNorm` folds x into the batch-norm statistics first.
    /// `fusion: false` is the MEND-like ablation: no inter-editing or score attention; every edit's scale
    /// is 1 and the past is kept whole.
    /// `memo` (inference only: a tape that does not record) keeps the projections of the past across calls.
    public func forward(tape: Tape, x: Tensor, lengths: [Int], mode: Int, pastReps: [Tensor]?, trainingNorm: Bool,
                        fusion: Bool = true, memo: PastProjections? = nil) -> AuxOutput {
        forward(tape: tape, inputs: [AuxInput(x: x, lengths: lengths, mode: mode, pastReps: pastReps, memo: memo)],
                trainingNorm: trainingNorm, fusion: fusion)[0]
    }

    /// Runs the network on several modules that share it, in one call: their rows stacked, so that each
    /// weight matrix is read once for all of them (with a dozen rows per module a call is bound by reading
    /// the weights). Row-wise stages (intra-editing attention, FFN) see the stacked rows; each module keeps
    /// its own sequence: its past, memo, causal inter-editing and score attention, and mode. The outputs
    /// are the single-module calls' outputs, in the order of `inputs`. `trainingNorm` folds every input's rows
    /// into the batch norm before any is normalised (as meta-training folds a step's rows first).
    public func forward(tape: Tape, inputs: [AuxInput], trainingNorm: Bool, fusion: Bool = true) -> [AuxOutput] {
        precondition(!inputs.isEmpty, "no inputs")
        for input in inputs {
            precondition(input.memo == nil || !tape.recording, "the past-projection memo is for inference")
            precondition(input.x.count == input.lengths.reduce(0, +) * dim,
                         "signal rows \(input.x.shape) do not match lengths \(input.lengths)")
            precondition(input.mode >= 0 && input.mode < modes, "mode \(input.mode) of \(modes)")
        }
        let x = inputs.count == 1 ? inputs[0].x : Tensor.concatenatingRows(inputs.map { $0.x.reshaped([$0.x.count / dim, dim]) })
        let lengths = inputs.flatMap(\.lengths)
        let normed = norm.forward(x, training: trainingNorm)
        var h = tape.leaf(normed.reshaped([lengths.isEmpty ? 0 : normed.count / dim, dim]))
        // Each input's token rows and edits among the stacked ones.
        let rowRanges = Self.consecutive(inputs.map { $0.lengths.reduce(0, +) })
        let editRanges = Self.consecutive(inputs.map(\.lengths.count))
        var newReps = Array(repeating: [Tensor](), count: inputs.count)
        var pus = Array(repeating: [Float](), count: inputs.count)
        var us = Array(repeating: [[Float]](), count: inputs.count)
        for l in 0..<config.layerN {
            let r = layer(tape: tape, l, h, inputs: inputs, lengths: lengths, rowRanges: rowRanges, editRanges: editRanges,
                          fusion: fusion)
            h = r.x
            for (g, part) in r.parts.enumerated() {
                newReps[g].append(part.newRep); pus[g].append(part.pastScale); us[g].append(part.scales)
            }
        }
        return inputs.indices.map { g in
            let lengths = inputs[g].lengths, n = lengths.count
            let hg = inputs.count == 1 ? h : tape.rows(h, rowRanges[g])
            let pastScale = pus[g].reduce(0, +) / Float(pus[g].count)
            let scales = (0..<n).map { i in us[g].map { $0[i] }.reduce(0, +) / Float(us[g].count) }
            // Per-token scale: the edit's scale over its length.
            var perToken: [Float] = []
            for (i, len) in lengths.enumerated() { perToken += Array(repeating: scales[i] / Float(len), count: len) }
            return AuxOutput(x1: tape.columns(hg, 0..<xDim), values: tape.columns(hg, xDim..<dim), pastUpdateScale: pastScale,
                             updateScales: scales, rowScales: perToken, newReps: newReps[g])
        }
    }

    private func v(_ tape: Tape, _ name: String) -> Variable { tape.parameter(byName[name]!) }

    private func linear(_ tape: Tape, _ x: Variable, _ name: String) -> Variable {
        tape.linear(x, v(tape, name + ".weight"), v(tape, name + ".bias"))
    }

    /// Multi-head attention of queries q [nq, H·D] over keys k and values v [nk, H·D] with an additive mask
    /// [nq, nk]: the heads' contexts side by side [nq, H·D] (before the output projection).
    private func attentionContext(tape: Tape, q: Variable, k: Variable, v vv: Variable, mask: Tensor,
                                  heads: Int, headDim: Int) -> Variable {
        if !tape.recording {
            // Inference: each head straight from the strided projections, no column copies of the past's
            // keys and values (N past rows per head, layer and module at every edit).
            let nq = q.value.shape[0], nk = k.value.shape[0], width = heads * headDim
            let context = Tensor(shape: [nq, width])
            let scores = Tensor(shape: [nq, nk])
            for hd in 0..<heads {
                Self.headScores(scores.data, q.value.data + hd * headDim, k.value.data + hd * headDim, nq: nq, nk: nk,
                                headDim: headDim, width: width)
                scores.add(mask)
                Kernels.softmaxForward(scores.data, scores.data, N: nq, C: nk)
                let v = vv.value.data + hd * headDim
                if nq <= Self.fewQueries {
                    for i in 0..<nq { BLAS.gemv(context.data + i * width + hd * headDim, v, scores.data + i * nk, M: nk, N: headDim, trans: true, lda: width) }
                } else {
                    BLAS.gemm(context.data + hd * headDim, scores.data, v, M: nq, N: headDim, K: nk, lda: nk, ldb: width, ldc: width)
                }
            }
            return tape.leaf(context)
        }
        let maskVar = tape.leaf(mask)
        var outs: [Variable] = []
        for hd in 0..<heads {
            let cols = (hd * headDim)..<((hd + 1) * headDim)
            let s = tape.add(tape.scale(tape.matmul(tape.columns(q, cols), tape.columns(k, cols), transB: true),
                                        1 / Float(headDim).squareRoot()), maskVar)
            outs.append(tape.matmul(tape.softmax(s), tape.columns(vv, cols)))
        }
        return heads == 1 ? outs[0] : tape.concatColumns(outs)
    }

    /// The memo of a past given by its representations (per layer, [past, dim]): what a sequence's state
    /// keeps instead of them.
    public func projections(ofPast reps: [Tensor]) -> PastProjections {
        precondition(reps.count == config.layerN, "\(reps.count) layers of representations for \(config.layerN)")
        let memo = PastProjections(layers: config.layerN)
        for (l, r) in reps.enumerated() {
            let p = "dafnet_model.layers.\(l)."
            let rows = r.reshaped([r.count / dim, dim])
            memo.set(l, keys: project(rows, p + "outer_att.lk"), values: project(rows, p + "outer_att.lv"),
                     scoreKeys: project(rows, p + "outer_att_score.lk"))
        }
        return memo
    }

    /// `rows` projected by the plain (untaped) weights of `name`, each row computed alike however many are
    /// projected with it, so projections kept in a memo (a few rows at a time, as edits arrive) are
    /// bit-identical to those of a state loaded from disk (all rows at once).
    private func project(_ rows: Tensor, _ name: String) -> Tensor {
        let w = byName[name + ".weight"]!.value, b = byName[name + ".bias"]!.value
        let OC = w.shape[0], C = w.shape[1], N = rows.count / max(C, 1)
        let out = Tensor(shape: [N, OC])
        Kernels.linearRowwise(out.data, rows.data, w.data, b.data, N: N, C: C, OC: OC)
        return out
    }

    /// Up to this many queries a head's scores and context are matrix-vector products over the keys and
    /// values as they lie (a matrix multiply would copy the past's N strided rows per head and call).
    static let fewQueries = 4

    /// One head's scaled scores [nq, nk] = q · kᵀ / √headDim, from queries and keys whose rows are `width` apart.
    private static func headScores(_ s: UnsafeMutablePointer<Float>, _ q: UnsafePointer<Float>, _ k: UnsafePointer<Float>,
                                   nq: Int, nk: Int, headDim: Int, width: Int) {
        let scale = 1 / Float(headDim).squareRoot()
        if nq <= fewQueries {
            for i in 0..<nq { BLAS.gemv(s + i * nk, k, q + i * width, M: nk, N: headDim, alpha: scale, lda: width) }
        } else {
            BLAS.gemm(s, q, k, M: nq, N: nk, K: headDim, transB: true, alpha: scale, lda: width, ldb: width)
        }
    }

    /// Head-averaged attention probabilities of the score attention (detached, as in the reference), from
    /// projected queries [nq, H·D] and keys [nk, H·D].
    private func scoreProbabilities(queries qv: Tensor, keys kv: Tensor, mask: Tensor, heads: Int, headDim: Int) -> Tensor {
        let nq = qv.shape[0], nk = kv.shape[0]
        let mean = Tensor(shape: [nq, nk])
        let s = Tensor(shape: [nq, nk])
        for hd in 0..<heads {
            Self.headScores(s.data, qv.data + hd * headDim, kv.data + hd * headDim, nq: nq, nk: nk, headDim: headDim, width: heads * headDim)
            s.add(mask)
            Kernels.softmaxForward(s.data, s.data, N: nq, C: nk)
            mean.add(s, alpha: 1 / Float(heads))
        }
        return mean
    }

    /// Consecutive ranges of the given sizes from 0: [2, 3] → [0..<2, 2..<5].
    private static func consecutive(_ sizes: [Int]) -> [Range<Int>] {
        var start = 0
        return sizes.map { size in
            defer { start += size }
            return start..<(start + size)
        }
    }

    /// One layer over the stacked rows of `inputs` (token rows in input order; `lengths` all their edits'
    /// lengths; each input's token rows and edits at `rowRanges` and `editRanges`). Per input: its
    /// representations after the layer, the decay of its past and its edits' scales.
    private func layer(tape: Tape, _ l: Int, _ x0: Variable, inputs: [AuxInput], lengths: [Int], rowRanges: [Range<Int>],
                       editRanges: [Range<Int>], fusion: Bool)
        -> (x: Variable, parts: [(newRep: Tensor, pastScale: Float, scales: [Float])]) {
        let p = "dafnet_model.layers.\(l)."
        let d = dim
        // Intra-editing attention: token values and a softmax-pooled sample representation per edit.
        let attX = linear(tape, tape.relu(linear(tape, x0, p + "inner_att.trans1.0")), p + "inner_att.trans1.2")
        let attS = linear(tape, tape.relu(linear(tape, attX, p + "inner_att.trans2.0")), p + "inner_att.trans2.2")
        let weighted = tape.rowScale(attX, tape.segmentSoftmax(attS, lengths: lengths))
        let sampleRep = tape.segmentSum(weighted, lengths: lengths)
        var x = tape.layerNorm(tape.add(x0, weighted), v(tape, p + "layer_norm1.weight"), v(tape, p + "layer_norm1.bias"))
        func edits(_ v: Variable, _ g: Int) -> Variable { inputs.count == 1 ? v : tape.rows(v, editRanges[g]) }
        var parts: [(newRep: Tensor, pastScale: Float, scales: [Float])] = []
        if fusion {
            // Inter-editing attention of each input over its past and current sample representations (causal).
            let q = linear(tape, sampleRep, p + "outer_att.lq")
            // The new rows' projections for every input at once (one pass over each weight matrix).
            lazy var newKeys = project(sampleRep.value, p + "outer_att.lk")
            lazy var newValues = project(sampleRep.value, p + "outer_att.lv")
            lazy var newScoreKeys = project(sampleRep.value, p + "outer_att_score.lk")
            let scoreQueries = project(sampleRep.value, p + "outer_att_score.lq")
            var contexts: [Variable] = []
            for (g, input) in inputs.enumerated() {
                let past = input.pastReps?[l] ?? Tensor(shape: [0, d])
                // A past the call is not given is the memo's.
                let P = input.pastReps == nil ? (input.memo?.rows[l]).map { max($0, 0) } ?? 0 : past.shape[0], n = input.lengths.count
                let rep = edits(sampleRep, g)
                let mask = Tensor(shape: [n, P + n])
                for i in 0..<n { for j in (P + i + 1)..<(P + n) { mask[i, j] = -999_999 } }
                let newRep: Tensor, k: Variable, vv: Variable, scoreKeys: Tensor
                if let memo = input.memo, let pk = memo.keys[l], let pv = memo.values[l], let psk = memo.scoreKeys[l], memo.rows[l] == P {
                    // The past's projections from the memo; only the new rows are projected.
                    newRep = input.pastReps == nil ? rep.value : past.reshaped([P, d]).appendingRows(rep.value)
                    k = tape.leaf(pk.appendingRows(newKeys.rows(editRanges[g])))
                    vv = tape.leaf(pv.appendingRows(newValues.rows(editRanges[g])))
                    scoreKeys = psk.appendingRows(newScoreKeys.rows(editRanges[g]))
                } else {
                    precondition(P == past.shape[0], "a past of \(P) rows without its representations or a memo of them")
                    let all = tape.concatRows([tape.leaf(past.reshaped([P, d])), rep])
                    newRep = all.value
                    if tape.recording || (input.memo == nil && P == 0) {
                        // Training (a fresh sequence in one call): the rows at once.
                        k = linear(tape, all, p + "outer_att.lk"); vv = linear(tape, all, p + "outer_att.lv")
                        scoreKeys = tape.linear(tape.leaf(newRep), tape.leaf(byName[p + "outer_att_score.lk.weight"]!.value),
                                                tape.leaf(byName[p + "outer_att_score.lk.bias"]!.value)).value
                    } else {
                        k = tape.leaf(project(newRep, p + "outer_att.lk")); vv = tape.leaf(project(newRep, p + "outer_att.lv"))
                        scoreKeys = project(newRep, p + "outer_att_score.lk")
                    }
                }
                if input.extendsMemo { input.memo?.set(l, keys: k.value, values: vv.value, scoreKeys: scoreKeys) }
                contexts.append(attentionContext(tape: tape, q: edits(q, g), k: k, v: vv, mask: mask,
                                                 heads: config.outerAttHeadN, headDim: config.outerAttDim))
                // Diagonal score attention → per-edit update scales and the decay of the past update.
                let probs = scoreProbabilities(queries: scoreQueries.rows(editRanges[g]), keys: scoreKeys, mask: mask,
                                               heads: config.outerScoreAttHeadN, headDim: config.outerScoreAttDim)
                var s = (0..<n).map { probs[$0, P + $0] }
                var keep = [Float](repeating: 1, count: n + 1)   // keep[i] = Π_{j ≥ i} (1 − s_j)
                for i in stride(from: n - 1, through: 0, by: -1) { keep[i] = keep[i + 1] * (1 - s[i]) }
                for i in 0..<max(n - 1, 0) { s[i] *= keep[i + 1] }
                parts.append((newRep, keep[0], s))
            }
            let outer = linear(tape, contexts.count == 1 ? contexts[0] : tape.concatRows(contexts), p + "outer_att.lo")
            x = tape.layerNorm(tape.add(x, tape.repeatSegments(outer, lengths: lengths)),
                               v(tape, p + "layer_norm2.weight"), v(tape, p + "layer_norm2.bias"))
        } else {
            // MEND-like: no inter-editing or score attention; the past is kept whole.
            parts = inputs.enumerated().map { g, input in
                let past = input.pastReps?[l] ?? Tensor(shape: [0, d])
                return (past.reshaped([past.shape[0], d]).appendingRows(edits(sampleRep, g).value), 1,
                        Array(repeating: 1, count: input.lengths.count))
            }
        }
        // FFN, then each input's mode: its scale and shift with a clamp residual.
        let ffn = linear(tape, tape.relu(linear(tape, x, p + "feedforward.fc1")), p + "feedforward.fc2")
        x = tape.layerNorm(tape.add(x, ffn), v(tape, p + "layer_norm3.weight"), v(tape, p + "layer_norm3.bias"))
        if inputs.count == 1 { return (modeTransform(tape: tape, p, x, mode: inputs[0].mode), parts) }
        let moded = zip(inputs, rowRanges).map { input, rows in modeTransform(tape: tape, p, tape.rows(x, rows), mode: input.mode) }
        return (tape.concatRows(moded), parts)
    }

    /// The mode's scale and shift with a clamp residual: clamp(x·scale + shift, min 0) + x.
    private func modeTransform(tape: Tape, _ p: String, _ x: Variable, mode: Int) -> Variable {
        let scale = tape.reshape(tape.rows(v(tape, p + "mode_scale.weight"), mode..<(mode + 1)), [dim])
        let shift = tape.reshape(tape.rows(v(tape, p + "mode_shift.weight"), mode..<(mode + 1)), [dim])
        let pre = tape.add(tape.mul(x, scale), shift)
        return tape.add(tape.clamp(pre, min: 0, max: .infinity), x)
    }
}
