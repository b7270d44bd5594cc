import Foundation
import TensorCore

/// A linear layer of the model, by its HF name, with an optional edit `ΔW` ([in, out]) and `Δb` ([out])
/// added to its forward without touching the base weights: y = W x + b + ΔWᵀ x + Δb.
public final class LinearModule: @unchecked Sendable {
    public let name: String
    public let inFeatures: Int
    public let outFeatures: Int
    public let layout: WeightLayout
    public let weight: Parameter
    public let bias: Parameter?
    /// Edit to the weight, [inFeatures, outFeatures] (the DAFNet `x1ᵀ x2` orientation).
    public var deltaWeight: Tensor?
    /// Edit to the bias, [outFeatures].
    public var deltaBias: Tensor?
    /// When false the module computes its unedited output (edits kept, not applied).
    public var editsEnabled = true
    /// Vectors added to chosen output rows of the next forwards (MEMIT's value search adds a δ at the
    /// subject's last token): `rows` index the forward's [B·T] positions, `vectors` is [rows.count, out].
    /// A constant offset: the backward pass is unchanged, and the gradient of a loss with respect to the
    /// vector of row r is the captured output gradient at r. Applied even with edits switched off.
    public var outputOffsets: (rows: [Int], vectors: Tensor)?

    init(name: String, inFeatures: Int, outFeatures: Int, layout: WeightLayout, weight: Parameter, bias: Parameter?) {
        self.name = name
        self.inFeatures = inFeatures
        self.outFeatures = outFeatures
        self.layout = layout
        self.weight = weight
        self.bias = bias
    }

    /// out[N, out] = inp[N, in] · W (+ b) (+ the edit on the first `editedRows` rows, default all, and of
    /// those only the rows `routed` sends to a shard, when given: ΔW, Δb; with frozen shards, a row sent to
    /// shard s < `frozenDeltaWeights.count` adds that shard's ΔW instead of `deltaWeight`).
    func forward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, N: Int, editedRows: Int? = nil,
                 routed: [Int32]? = nil) {
        Kernels.linearForward(out, inp, weight.value.data, bias?.value.data, N: N, C: inFeatures, OC: outFeatures, layout: layout)
        if isEdited {
            for (run, shard) in Self.editedRuns(min(editedRows ?? N, N), routed: routed) {
                if let d = weightDelta(shard: shard) {
                    BLAS.gemm(out + run.lowerBound * outFeatures, inp + run.lowerBound * inFeatures, d.data,
                              M: run.count, N: outFeatures, K: inFeatures, beta: 1)
                }
                if let db = deltaBias {
                    for n in run { BLAS.axpy(out + n * outFeatures, db.data, count: outFeatures, alpha: 1) }
                }
            }
        }
        if let o = outputOffsets {
            for (i, r) in o.rows.enumerated() where r < N {
                BLAS.axpy(out + r * outFeatures, o.vectors.data + i * outFeatures, count: outFeatures, alpha: 1)
            }
        }
    }

    /// Frozen shards' edits to the weight (`ls_shard_edits`), each [inFeatures, outFeatures]: a routed row
    /// sent to shard s < count adds the s-th; rows of later shards add `deltaWeight`.
    public var frozenDeltaWeights: [Tensor] = []

    /// Whether the module's forward adds an edit (one switched on and present).
    public var isEdited: Bool { editsEnabled && (deltaWeight != nil || deltaBias != nil || !frozenDeltaWeights.isEmpty) }

    /// The ΔW that rows routed to `shard` add.
    func weightDelta(shard: Int32) -> Tensor? {
        Int(shard) < frozenDeltaWeights.count ? frozenDeltaWeights[Int(shard)] : deltaWeight
    }

    /// The runs of consecutive rows below `edited` that `routed` sends to one shard (all of them, shard 0,
    /// without `routed`); rows at −1 see no edit.
    static func editedRuns(_ edited: Int, routed: [Int32]?) -> [(rows: Range<Int>, shard: Int32)] {
        guard edited > 0 else { return [] }
        guard let routed else { return [(0..<edited, 0)] }
        var runs: [(rows: Range<Int>, shard: Int32)] = []
        var start = 0
        while start < edited {
            let s = routed[start]
            var end = start + 1
            while end < edited && routed[end] == s { end += 1 }
            if s >= 0 { runs.append((start..<end, s)) }
            start = end
        }
        return runs
    }

    /// Adds ∂/∂inp into `dinp` (when given) and, with `parameterGradients`, ∂/∂W and ∂/∂b into the grads.
    /// The edit's term goes to the rows `routed` marks, as in the forward.
    func backward(dinp: UnsafeMutablePointer<Float>?, dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, N: Int,
                  parameterGradients: Bool, routed: [Int32]? = nil) {
        Kernels.linearBackward(dinp: dinp, dweight: parameterGradients ? weight.grad.data : nil,
                               dbias: parameterGradients ? bias?.grad.data : nil, dout: dout, inp: inp,
                               weight: weight.value.data, N: N, C: inFeatures, OC: outFeatures, layout: layout)
        if editsEnabled, let dinp {
            for (run, shard) in Self.editedRuns(N, routed: routed) {
                guard let d = weightDelta(shard: shard) else { continue }
                BLAS.gemm(dinp + run.lowerBound * inFeatures, dout + run.lowerBound * outFeatures, d.data,
                          M: run.count, N: inFeatures, K: outFeatures, transB: true, beta: 1)
            }
        }
    }
}

/// Token ids of B sequences of length T, with an optional attention mask (1 = real token).
public struct TokenBatch: Sendable {
    public let B: Int
    public let T: Int
    public let ids: [Int32]
    public let mask: [Float]?
    /// Position ids: 0..<T without a mask; with a mask, the count of real tokens before each one
    /// (HF's `cumsum(mask) − 1`), so left padding does not shift positions.
    public let positions: [Int32]

    public init(ids: [Int32], B: Int, T: Int, mask: [Float]? = nil) {
        precondition(ids.count == B * T && (mask?.count ?? B * T) == B * T, "batch of \(B)×\(T) needs \(B * T) ids")
        self.B = B; self.T = T; self.ids = ids; self.mask = mask
        var pos = [Int32](repeating: 0, count: B * T)
        for b in 0..<B {
            var seen: Int32 = 0
            for t in 0..<T {
                if let mask {
                    if mask[b * T + t] != 0 { seen += 1 }
                    pos[b * T + t] = max(seen - 1, 0)
                } else {
                    pos[b * T + t] = Int32(t)
                }
            }
        }
        positions = pos
    }

    /// One sequence.
    public init(_ sequence: [Int]) { self.init(ids: sequence.map(Int32.init), B: 1, T: sequence.count) }

    /// Sequences of different lengths padded on the right with `pad`, with the mask marking real tokens.
    public init(rightPadded sequences: [[Int]], pad: Int = 0) {
        let T = sequences.map(\.count).max() ?? 0
        var ids = [Int32](repeating: Int32(pad), count: sequences.count * T)
        var mask = [Float](repeating: 0, count: sequences.count * T)
        for (b, s) in sequences.enumerated() {
            for (t, id) in s.enumerated() { ids[b * T + t] = Int32(id); mask[b * T + t] = 1 }
        }
        let full = mask.allSatisfy { $0 == 1 }
        self.init(ids: ids, B: sequences.count, T: T, mask: full ? nil : mask)
    }
}

/// What the backward pass captured for a linear module: its input `u` [N, in] and the gradient at its
/// output `delta` [N, out], one row per position (the DAFNet gradient signal).
public struct ModuleSignal: Sendable {
    public let u: Tensor
    public let delta: Tensor
}

/// Per-sequence key/value cache for greedy generation.
public final class KVCache: @unchecked Sendable {
    public let capacity: Int
    public private(set) var length = 0
    let keys: [Tensor]
    let values: [Tensor]

    init(layers: Int, capacity: Int, kvDim: Int) {
        self.capacity = capacity
        keys = (0..<layers).map { _ in Tensor(shape: [capacity, kvDim]) }
        values = (0..<layers).map { _ in Tensor(shape: [capacity, kvDim]) }
    }

    /// With a routed model: the shard of the closest key a position of this sequence has matched so far
    /// (−1: none yet, the edits are off) and its cosine.
    var route = RouteHit.none

    func advance(_ n: Int) { length += n }
    public func reset() { length = 0; route = .none }
}

/// A decoder-only transformer (GPT-2 or Llama family): parameters in one contiguous block with named
/// views, forward with saved activations, a hand-written backward mirroring it (llm.c style),
/// gradient-signal capture and per-module edits.
public final class TransformerLM: @unchecked Sendable {
    public let spec: TransformerSpec
    /// Every parameter under its HF name, views into one block (and one gradient block).
    public let parameters: [Parameter]
    public let parameterBlock: Tensor
    public let gradientBlock: Tensor
    private let byName: [String: Parameter]

    struct Layer {
        let norm1: Parameter, norm1Bias: Parameter?
        let qkv: [LinearModule]
        let attnOut: LinearModule
        let norm2: Parameter, norm2Bias: Parameter?
        let mlpIn: [LinearModule]
        let mlpOut: LinearModule
    }

    let layers: [Layer]
    let tokenEmbedding: Parameter
    let positionEmbedding: Parameter?
    let finalNorm: Parameter, finalNormBias: Parameter?
    let head: Parameter
    let rotary: RotaryTable?
    public let linears: [String: LinearModule]

    /// Zero-initialised parameters for `spec` (load or initialise them afterwards).
    public init(spec: TransformerSpec) {
        self.spec = spec
        let shapes = spec.parameterShapes()
        let total = shapes.reduce(0) { $0 + $1.shape.reduce(1, *) }
        parameterBlock = Tensor(shape: [total])
        gradientBlock = Tensor(shape: [total])
        var params: [Parameter] = []
        var offset = 0
        for (name, shape) in shapes {
            let n = shape.reduce(1, *)
            let v = Tensor(storage: parameterBlock.storage, offset: offset, shape: shape)
            let g = Tensor(storage: gradientBlock.storage, offset: offset, shape: shape)
            let isNormOrBias = name.hasSuffix(".bias") || shape.count == 1
            params.append(Parameter(name: name, value: v, grad: g, decay: !isNormOrBias && !name.contains("wpe")))
            offset += n
        }
        parameters = params
        let map = Dictionary(uniqueKeysWithValues: params.map { ($0.name, $0) })
        byName = map
        func p(_ n: String) -> Parameter { map[n]! }
        func opt(_ n: String) -> Parameter? { map[n] }
        var lin: [String: LinearModule] = [:]
        func linear(_ name: String, _ inF: Int, _ outF: Int) -> LinearModule {
            let m = LinearModule(name: name, inFeatures: inF, outFeatures: outF, layout: spec.layout,
                                 weight: p(name + ".weight"), bias: opt(name + ".bias"))
            lin[name] = m
            return m
        }
        let names = spec.names
        var ls: [Layer] = []
        for l in 0..<spec.layers {
            let pre = names.layerPrefix(l) + "."
            let qkvOuts = names.qkv.count == 1 ? [spec.qDim + 2 * spec.kvDim] : [spec.qDim, spec.kvDim, spec.kvDim]
            ls.append(Layer(
                norm1: p(pre + names.norm1 + ".weight"), norm1Bias: opt(pre + names.norm1 + ".bias"),
                qkv: zip(names.qkv, qkvOuts).map { linear(pre + $0, spec.hidden, $1) },
                attnOut: linear(pre + names.attnOut, spec.qDim, spec.hidden),
                norm2: p(pre + names.norm2 + ".weight"), norm2Bias: opt(pre + names.norm2 + ".bias"),
                mlpIn: names.mlpIn.map { linear(pre + $0, spec.hidden, spec.intermediate) },
                mlpOut: linear(pre + names.mlpOut, spec.intermediate, spec.hidden)))
        }
        layers = ls
        linears = lin
        tokenEmbedding = p(names.tokenEmbedding + ".weight")
        positionEmbedding = names.positionEmbedding.flatMap { opt($0 + ".weight") }
        finalNorm = p(names.finalNorm + ".weight")
        finalNormBias = opt(names.finalNorm + ".bias")
        head = spec.tiedHead ? tokenEmbedding : p(names.head! + ".weight")
        if case let .rotary(theta) = spec.positions {
            rotary = RotaryTable(headDim: spec.headDim, maxPositions: spec.maxPositions, theta: theta)
        } else {
            rotary = nil
        }
    }

    public func parameter(_ name: String) -> Parameter? { byName[name] }

    public var parameterCount: Int { parameterBlock.count }

    /// GPT-2-style initialisation: normal(0, std) weights, zero biases, unit norm gains, and the residual
    /// output projections scaled by 1/√(2·layers).
    public func initialise(seed: UInt64, std: Float = 0.02) {
        var rng = RNG(seed: seed)
        let residualProjections = Set(layers.flatMap { [$0.attnOut.name, $0.mlpOut.name] }.map { $0 + ".weight" })
        for p in parameters {
            if p.value.rank == 1 {
                p.value.fill(p.name.hasSuffix(".bias") ? 0 : 1)
            } else {
                let s = residualProjections.contains(p.name) ? std / Float(2 * spec.layers).squareRoot() : std
                for i in 0..<p.value.count { p.value[i] = rng.normal() * s }
            }
        }
    }

    /// Runs `body` on the unedited model (edits and the router switched off, then restored).
    public func withoutEdits<T>(_ body: () throws -> T) rethrows -> T {
        let modules = Array(linears.values)
        let saved = modules.map(\.editsEnabled), savedRouter = router
        for m in modules { m.editsEnabled = false }
        router = nil
        defer {
            for (m, e) in zip(modules, saved) { m.editsEnabled = e }
            router = savedRouter
        }
        return try body()
    }

    /// Removes every module edit and the router.
    public func clearEdits() {
        for m in linears.values { m.deltaWeight = nil; m.deltaBias = nil; m.frozenDeltaWeights = [] }
        router = nil
    }

    /// Which positions see the edits (nil: all of them). Its block must hold no edited module before its
    /// site, and no block below it any.
    public var router: EditRouter?

    // MARK: Activations

    final class Activations {
        let B: Int, T: Int, N: Int
        var residual: [Tensor]           // L+1 × [N, C]: the stream entering each layer, and the final one
        var ln1: [Tensor], ln1Mean: [Tensor], ln1Rstd: [Tensor]
        var qkv: [[Tensor]]              // per layer, per projection
        var probs: [Tensor]              // [B, NH, T, T]
        var att: [Tensor]                // [N, qDim]
        var res1: [Tensor]               // [N, C]
        var ln2: [Tensor], ln2Mean: [Tensor], ln2Rstd: [Tensor]
        var mlpPre: [[Tensor]]           // per layer, per input projection [N, FF]
        var mlpAct: [Tensor]             // [N, FF]
        let lnf: Tensor, lnfMean: Tensor, lnfRstd: Tensor
        let logits: Tensor
        let scratch: Tensor              // [N, C]
        var batch: TokenBatch?
        /// With a router: per row, the shard whose edit it sees, −1 for none (set at the router's block;
        /// nil: every row sees the edits).
        var routed: [Int32]?

        /// `cached`: for the cached path, which attends over its caches and takes the logits of last tokens
        /// only: no [B, heads, T, T] probabilities and no [N, vocab] logits.
        /// The buffers are not zeroed: a forward writes each one whole (embeddings, norms, products, the
        /// attention's probabilities and outputs, sums) before anything reads it, and a block a run does not
        /// reach is never read.
        init(spec s: TransformerSpec, B: Int, T: Int, qkvOuts: [Int], mlpInCount: Int, cached: Bool = false) {
            self.B = B; self.T = T; N = B * T
            let N = B * T, C = s.hidden, L = s.layers
            func one(_ shape: [Int]) -> Tensor { Tensor(uninitializedShape: shape) }
            func many(_ shape: [Int]) -> [Tensor] { (0..<L).map { _ in one(shape) } }
            residual = (0...L).map { _ in one([N, C]) }
            ln1 = many([N, C]); ln1Mean = many([N]); ln1Rstd = many([N])
            qkv = (0..<L).map { _ in qkvOuts.map { one([N, $0]) } }
            probs = cached ? [] : many([B, s.heads, T, T])
            att = many([N, s.qDim])
            res1 = many([N, C])
            ln2 = many([N, C]); ln2Mean = many([N]); ln2Rstd = many([N])
            mlpPre = (0..<L).map { _ in (0..<mlpInCount).map { _ in one([N, s.intermediate]) } }
            mlpAct = many([N, s.intermediate])
            lnf = one([N, C]); lnfMean = one([N]); lnfRstd = one([N])
            logits = one([cached ? 0 : N, s.vocabSize])
            scratch = one([N, C])
        }
    }

    private var acts: Activations?

    private func activations(B: Int, T: Int) -> Activations {
        if let a = acts, a.B == B, a.T == T { return a }
        let qkvOuts = layers[0].qkv.map(\.outFeatures)
        let a = Activations(spec: spec, B: B, T: T, qkvOuts: qkvOuts, mlpInCount: layers[0].mlpIn.count)
        acts = a
        return a
    }

    /// The input rows [B·T, in] that `module` saw in the last forward (a view into the saved activations,
    /// valid until the next forward), or nil for a module this model does not have.
    public func lastInput(of module: String) -> Tensor? {
        guard let a = acts else { return nil }
        for (l, layer) in layers.enumerated() {
            if layer.qkv.contains(where: { $0.name == module }) { return a.ln1[l] }
            if layer.attnOut.name == module { return a.att[l] }
            if layer.mlpIn.contains(where: { $0.name == module }) { return a.ln2[l] }
            if layer.mlpOut.name == module { return a.mlpAct[l] }
        }
        return nil
    }

    /// The residual stream leaving block `layer` in the last forward, [B·T, hidden] (a view into the saved
    /// activations, valid until the next forward).
    public func lastBlockOutput(layer: Int) -> Tensor? {
        guard let a = acts, layer >= 0, layer < spec.layers else { return nil }
        return a.residual[layer + 1]
    }

    /// The stream that `site` of block `layer` reads, at one position of each sequence, on the unedited
    /// model: the sequences packed into rows and run through blocks 0…layer only (no logits). [count, hidden].
    public func siteRows(_ sequences: [[Int]], at positions: [Int], layer: Int, site: RouteSite) throws -> Tensor {
        precondition(sequences.count == positions.count && layer >= 0 && layer < spec.layers, "siteRows: one position per sequence, a block of the model")
        let C = spec.hidden
        let out = Tensor(shape: [sequences.count, C])
        guard !sequences.isEmpty else { return out }
        let rows = try PackedRows(sequences, spec: spec)
        let a = withoutEdits { run(rows, blocks: 0..<(layer + 1), stoppingAt: site) }
        let x = site == .attentionInput ? a.ln1[layer] : a.ln2[layer]
        for (i, (seg, p)) in zip(rows.segments, positions).enumerated() {
            precondition(p >= 0 && p < seg.count, "siteRows: position \(p) outside a sequence of \(seg.count)")
            (out.data + i * C).update(from: x.data + (seg.row + p) * C, count: C)
        }
        return out
    }

    /// With a router: which rows of the last forward saw the edits (nil: all of them, or no router).
    public var lastRoutedRows: [Bool]? { acts?.routed?.map { $0 >= 0 } }
    /// With a router: per row of the last forward, the shard whose edit it saw (−1: none).
    public var lastRoutedShards: [Int32]? { acts?.routed }

    /// Releases the saved activations.
    public func releaseActivations() { acts = nil }

    // MARK: Forward

    private func norm(_ out: Tensor, mean: Tensor, rstd: Tensor, _ inp: Tensor, _ w: Parameter, _ b: Parameter?, N: Int) {
        switch spec.norm {
        case let .layer(eps):
            Kernels.layerNormForward(out.data, mean: mean.data, rstd: rstd.data, inp.data, weight: w.value.data,
                                     bias: b?.value.data, N: N, C: spec.hidden, eps: eps)
        case let .rms(eps):
            Kernels.rmsNormForward(out.data, rrms: rstd.data, inp.data, weight: w.value.data, N: N, C: spec.hidden, eps: eps)
        }
    }

    private func normBackward(dinp: Tensor, dout: Tensor, inp: Tensor, mean: Tensor, rstd: Tensor,
                              _ w: Parameter, _ b: Parameter?, N: Int, parameterGradients: Bool) {
        switch spec.norm {
        case .layer:
            Kernels.layerNormBackward(dinp: dinp.data, dweight: parameterGradients ? w.grad.data : nil,
                                      dbias: parameterGradients ? b?.grad.data : nil, dout: dout.data, inp: inp.data,
                                      weight: w.value.data, mean: mean.data, rstd: rstd.data, N: N, C: spec.hidden)
        case .rms:
            Kernels.rmsNormBackward(dinp: dinp.data, dweight: parameterGradients ? w.grad.data : nil, dout: dout.data,
                                    inp: inp.data, weight: w.value.data, rrms: rstd.data, N: N, C: spec.hidden)
        }
    }

    /// q, k, v pointers and per-position strides into the projection outputs (fused or separate).
    private func qkvPointers(_ t: [Tensor]) -> (UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>, Int, Int) {
        if t.count == 1 {
            let w = spec.qDim + 2 * spec.kvDim
            return (t[0].data, t[0].data + spec.qDim, t[0].data + spec.qDim + spec.kvDim, w, w)
        }
        return (t[0].data, t[1].data, t[2].data, spec.qDim, spec.kvDim)
    }

    /// Forward pass over a batch; returns the logits [B·T, vocab] and keeps what backward needs.
    /// The returned tensor is reused by the next forward of the same shape: copy it to keep it.
    @discardableResult
    public func forward(_ batch: TokenBatch) -> Tensor {
        let a = activations(B: batch.B, T: batch.T)
        a.batch = batch
        a.routed = nil
        let N = a.N
        precondition(batch.positions.allSatisfy { Int($0) < spec.maxPositions }, "sequence longer than the model's \(spec.maxPositions) positions")
        embed(into: a.residual[0], ids: batch.ids, positions: batch.positions)
        for (l, layer) in layers.enumerated() {
            forwardLayer(l, layer, a, batch: batch, segments: nil)
        }
        return finishForward(a.residual[spec.layers], lnf: a.lnf, mean: a.lnfMean, rstd: a.lnfRstd, logits: a.logits, N: N)
    }

    /// The token embeddings of `ids`, plus the learned position embeddings (GPT-2) at `positions`.
    private func embed(into out: Tensor, ids: [Int32], positions: [Int32]) {
        let N = ids.count, C = spec.hidden
        ids.withUnsafeBufferPointer { p in
            Kernels.embeddingForward(out.data, ids: p.baseAddress!, table: tokenEmbedding.value.data, N: N, C: C)
        }
        if let wpe = positionEmbedding {
            for n in 0..<N { BLAS.axpy(out.data + n * C, wpe.value.data + Int(positions[n]) * C, count: C, alpha: 1) }
        }
    }

    private func finishForward(_ x: Tensor, lnf: Tensor, mean: Tensor, rstd: Tensor, logits: Tensor, N: Int) -> Tensor {
        norm(lnf, mean: mean, rstd: rstd, x, finalNorm, finalNormBias, N: N)
        BLAS.gemm(logits.data, lnf.data, head.value.data, M: N, N: spec.vocabSize, K: spec.hidden, transB: true)
        return logits
    }

    /// One sequence's rows in a packed forward: rows `row..<row+count`, attending to each other causally
    /// and, with a cache, after the cache's past (their keys and values appended to it).
    struct Segment {
        let cache: KVCache?
        let row: Int
        let count: Int
    }

    /// One block over the rows of `a`: a padded batch (`segments` nil, attention within each sequence of
    /// `batch`) or packed sequences (`segments`), each continuing its own key/value cache if it has one.
    /// `editedRows`: only the first rows see the edits (the rest run as the unedited model).
    /// `stoppingAt`: return once the stream at that site is normalised (and routed), leaving the rest of the block.
    private func forwardLayer(_ l: Int, _ layer: Layer, _ a: Activations, batch: TokenBatch, segments: [Segment]?,
                              editedRows: Int? = nil, stoppingAt site: RouteSite? = nil) {
        let N = a.N, C = spec.hidden
        let x = a.residual[l]
        norm(a.ln1[l], mean: a.ln1Mean[l], rstd: a.ln1Rstd[l], x, layer.norm1, layer.norm1Bias, N: N)
        route(l, .attentionInput, a.ln1[l], a, batch: batch, segments: segments)
        if site == .attentionInput { return }
        for (m, out) in zip(layer.qkv, a.qkv[l]) { m.forward(out.data, a.ln1[l].data, N: N, editedRows: editedRows, routed: a.routed) }
        let (q, k, v, qs, kvs) = qkvPointers(a.qkv[l])
        if let rotary {
            batch.positions.withUnsafeBufferPointer { pos in
                Kernels.rotary(q, positions: pos.baseAddress!, table: rotary, N: N, heads: spec.heads, stride: qs)
                Kernels.rotary(k, positions: pos.baseAddress!, table: rotary, N: N, heads: spec.kvHeads, stride: kvs)
            }
        }
        if let segments {
            for seg in segments where seg.count > 0 {
                var keys = UnsafePointer(k + seg.row * kvs), values = UnsafePointer(v + seg.row * kvs), stride = kvs, past = 0
                if let cache = seg.cache {
                    past = cache.length
                    let kc = cache.keys[l].data + past * spec.kvDim, vc = cache.values[l].data + past * spec.kvDim
                    for t in 0..<seg.count {
                        (kc + t * spec.kvDim).update(from: k + (seg.row + t) * kvs, count: spec.kvDim)
                        (vc + t * spec.kvDim).update(from: v + (seg.row + t) * kvs, count: spec.kvDim)
                    }
                    (keys, values, stride) = (UnsafePointer(cache.keys[l].data), UnsafePointer(cache.values[l].data), spec.kvDim)
                }
                Kernels.attentionCached(a.att[l].data + seg.row * spec.qDim, q: q + seg.row * qs, qStride: qs,
                                        kCache: keys, vCache: values, kvStride: stride,
                                        past: past, Tq: seg.count, NH: spec.heads, NKV: spec.kvHeads, HS: spec.headDim)
            }
        } else {
            let shape = AttentionShape(B: a.B, T: a.T, NH: spec.heads, NKV: spec.kvHeads, HS: spec.headDim,
                                       qStride: qs, kStride: kvs, vStride: kvs, outStride: spec.qDim)
            Kernels.attentionForward(a.att[l].data, probs: a.probs[l].data, q: q, k: k, v: v, keyMask: batch.mask, shape)
        }
        layer.attnOut.forward(a.scratch.data, a.att[l].data, N: N, editedRows: editedRows, routed: a.routed)
        Kernels.add(a.res1[l].data, x.data, a.scratch.data, count: N * C)
        norm(a.ln2[l], mean: a.ln2Mean[l], rstd: a.ln2Rstd[l], a.res1[l], layer.norm2, layer.norm2Bias, N: N)
        route(l, .mlpInput, a.ln2[l], a, batch: batch, segments: segments)
        if site == .mlpInput { return }
        for (m, out) in zip(layer.mlpIn, a.mlpPre[l]) { m.forward(out.data, a.ln2[l].data, N: N, editedRows: editedRows, routed: a.routed) }
        let count = N * spec.intermediate
        switch spec.mlp {
        case .gelu: Kernels.geluForward(a.mlpAct[l].data, a.mlpPre[l][0].data, count: count)
        case .swiglu: Kernels.swigluForward(a.mlpAct[l].data, gate: a.mlpPre[l][0].data, up: a.mlpPre[l][1].data, count: count)
        }
        layer.mlpOut.forward(a.scratch.data, a.mlpAct[l].data, N: N, editedRows: editedRows, routed: a.routed)
        Kernels.add(a.residual[l + 1].data, a.res1[l].data, a.scratch.data, count: N * C)
    }

    /// At the router's block and site: marks the rows from each sequence's first match on (a cached
    /// sequence continues its earlier state) as the ones that see the edits, each row with the shard of the
    /// closest key its sequence has matched up to it.
    private func route(_ l: Int, _ site: RouteSite, _ x: Tensor, _ a: Activations, batch: TokenBatch, segments: [Segment]?) {
        guard let router, router.layer == l, router.site == site else { return }
        var routed = [Int32](repeating: -1, count: a.N)
        if let segments {
            // With one shard, a sequence whose cache is already routed stays as it is: only the others' rows
            // are compared with the keys (in a decode step, usually the unedited half of the batch).
            let open = router.shardCount > 1 ? segments : segments.filter { $0.cache.map { $0.route.shard < 0 } ?? true }
            let openRows = open.reduce(0) { $0 + $1.count }
            var hit = [RouteHit](repeating: .none, count: a.N)
            if openRows == a.N {
                hit = router.closest(x.data, N: a.N)
            } else if openRows > 0 {
                let C = x.shape[1]
                let gathered = Tensor(shape: [openRows, C])
                var at = 0
                for seg in open {
                    (gathered.data + at * C).update(from: x.data + seg.row * C, count: seg.count * C)
                    at += seg.count
                }
                let found = router.closest(gathered.data, N: openRows)
                at = 0
                for seg in open {
                    for i in 0..<seg.count { hit[seg.row + i] = found[at + i] }
                    at += seg.count
                }
            }
            for seg in segments {
                var state = seg.cache?.route ?? .none
                for r in seg.row..<(seg.row + seg.count) { state = state.continued(by: hit[r]); routed[r] = state.shard }
                seg.cache?.route = state
            }
        } else {
            let hit = router.closest(x.data, N: a.N)
            for b in 0..<a.B {
                var state = RouteHit.none
                for t in 0..<a.T {
                    let r = b * a.T + t
                    if (batch.mask?[r] ?? 1) != 0 { state = state.continued(by: hit[r]) }
                    routed[r] = state.shard
                }
            }
        }
        a.routed = routed
    }

    // MARK: Backward

    /// Backward from `dlogits` [B·T, vocab] through the last forward. Adds parameter gradients when
    /// `parameterGradients` (else stops at the lowest captured module's layer), and returns the
    /// signals of the modules named in `capture`.
    @discardableResult
    public func backward(dlogits: Tensor, parameterGradients: Bool = true, capture: Set<String> = []) -> [String: ModuleSignal] {
        guard let a = acts, let batch = a.batch else { preconditionFailure("backward before forward") }
        let N = a.N, C = spec.hidden, FF = spec.intermediate
        var signals: [String: ModuleSignal] = [:]
        var stopLayer = 0
        if !parameterGradients {
            let capturedLayers = layers.indices.filter { l in spec.linearModules(layer: l).contains { capture.contains($0) } }
            stopLayer = capturedLayers.min() ?? spec.layers
        }
        func captured(_ m: LinearModule, dout: UnsafePointer<Float>, inp: Tensor) {
            guard capture.contains(m.name) else { return }
            let d = Tensor(shape: [N, m.outFeatures])
            d.data.update(from: dout, count: N * m.outFeatures)
            signals[m.name] = ModuleSignal(u: inp.copy(), delta: d)
        }
        // Head and final norm.
        let dres = Tensor(shape: [N, C])
        let dlnf = Tensor(shape: [N, C])
        BLAS.gemm(dlnf.data, dlogits.data, head.value.data, M: N, N: C, K: spec.vocabSize)
        if parameterGradients {
            BLAS.gemm(head.grad.data, dlogits.data, a.lnf.data, M: spec.vocabSize, N: C, K: N, transA: true, beta: 1)
        }
        normBackward(dinp: dres, dout: dlnf, inp: a.residual[spec.layers], mean: a.lnfMean, rstd: a.lnfRstd,
                     finalNorm, finalNormBias, N: N, parameterGradients: parameterGradients)

        let dact = Tensor(shape: [N, FF])
        let dpre = layers[0].mlpIn.map { _ in Tensor(shape: [N, FF]) }
        let dln = Tensor(shape: [N, C])
        let datt = Tensor(shape: [N, spec.qDim])
        let dqkv = layers[0].qkv.map { Tensor(shape: [N, $0.outFeatures]) }
        for l in stride(from: spec.layers - 1, through: stopLayer, by: -1) {
            let layer = layers[l]
            // residual[l+1] = res1 + mlpOut(act)
            dact.zero()
            layer.mlpOut.backward(dinp: dact.data, dout: dres.data, inp: a.mlpAct[l].data, N: N, parameterGradients: parameterGradients,
                        routed: a.routed)
            captured(layer.mlpOut, dout: dres.data, inp: a.mlpAct[l])
            for t in dpre { t.zero() }
            switch spec.mlp {
            case .gelu:
                Kernels.geluBackward(dinp: dpre[0].data, dout: dact.data, inp: a.mlpPre[l][0].data, count: N * FF)
            case .swiglu:
                Kernels.swigluBackward(dgate: dpre[0].data, dup: dpre[1].data, dout: dact.data, gate: a.mlpPre[l][0].data,
                                       up: a.mlpPre[l][1].data, count: N * FF)
            }
            // The lowest block's attention half is needed only for its gradients or a captured module in it:
            // without them, the MLP inputs' signals are the last thing the walk down computes.
            let lastHalf = !parameterGradients && l == stopLayer
                && !([layer.attnOut] + layer.qkv).contains { capture.contains($0.name) }
            if lastHalf {
                for (m, d) in zip(layer.mlpIn, dpre) { captured(m, dout: d.data, inp: a.ln2[l]) }
                break
            }
            dln.zero()
            for (m, d) in zip(layer.mlpIn, dpre) {
                m.backward(dinp: dln.data, dout: d.data, inp: a.ln2[l].data, N: N, parameterGradients: parameterGradients,
                        routed: a.routed)
                captured(m, dout: d.data, inp: a.ln2[l])
            }
            normBackward(dinp: dres, dout: dln, inp: a.res1[l], mean: a.ln2Mean[l], rstd: a.ln2Rstd[l],
                         layer.norm2, layer.norm2Bias, N: N, parameterGradients: parameterGradients)
            // res1 = residual[l] + attnOut(att)
            datt.zero()
            layer.attnOut.backward(dinp: datt.data, dout: dres.data, inp: a.att[l].data, N: N, parameterGradients: parameterGradients,
                        routed: a.routed)
            captured(layer.attnOut, dout: dres.data, inp: a.att[l])
            for t in dqkv { t.zero() }
            let (q, k, v, qs, kvs) = qkvPointers(a.qkv[l])
            let (dq, dk, dv, _, _) = qkvPointers(dqkv)
            let shape = AttentionShape(B: a.B, T: a.T, NH: spec.heads, NKV: spec.kvHeads, HS: spec.headDim,
                                       qStride: qs, kStride: kvs, vStride: kvs, outStride: spec.qDim)
            Kernels.attentionBackward(dq: dq, dk: dk, dv: dv, dout: datt.data, probs: a.probs[l].data, q: q, k: k, v: v, shape)
            if let rotary {
                batch.positions.withUnsafeBufferPointer { pos in
                    Kernels.rotary(dq, positions: pos.baseAddress!, table: rotary, N: N, heads: spec.heads, stride: qs, inverse: true)
                    Kernels.rotary(dk, positions: pos.baseAddress!, table: rotary, N: N, heads: spec.kvHeads, stride: kvs, inverse: true)
                }
            }
            dln.zero()
            for (m, d) in zip(layer.qkv, dqkv) {
                m.backward(dinp: dln.data, dout: d.data, inp: a.ln1[l].data, N: N, parameterGradients: parameterGradients,
                        routed: a.routed)
                captured(m, dout: d.data, inp: a.ln1[l])
            }
            normBackward(dinp: dres, dout: dln, inp: a.residual[l], mean: a.ln1Mean[l], rstd: a.ln1Rstd[l],
                         layer.norm1, layer.norm1Bias, N: N, parameterGradients: parameterGradients)
        }
        if parameterGradients {
            batch.ids.withUnsafeBufferPointer { ids in
                Kernels.embeddingBackward(dtable: tokenEmbedding.grad.data, dout: dres.data, ids: ids.baseAddress!, N: N, C: C)
            }
            if let wpe = positionEmbedding {
                for n in 0..<N { BLAS.axpy(wpe.grad.data + Int(batch.positions[n]) * C, dres.data + n * C, count: C, alpha: 1) }
            }
        }
        return signals
    }

    public func zeroGradients() { gradientBlock.zero() }

    // MARK: Generation

    /// A key/value cache for one sequence of up to `capacity` tokens.
    public func makeCache(capacity: Int? = nil) -> KVCache {
        KVCache(layers: spec.layers, capacity: min(capacity ?? spec.maxPositions, spec.maxPositions), kvDim: spec.kvDim)
    }

    /// Runs `tokens` (continuing the cached sequence) and returns the logits of the last one [vocab].
    public func forwardCached(_ tokens: [Int], cache: KVCache) throws -> Tensor {
        try forwardCached([tokens], caches: [cache]).reshaped([spec.vocabSize])
    }

    /// Runs several sequences at once, each continuing its own cache: their tokens packed into one set of
    /// rows (no padding) for the projections, attention per sequence over its cache. Returns the logits of
    /// each sequence's last token [sequences, vocab].
    /// `uneditedFrom`: the sequences from this index on run as the unedited model.
    public func forwardCached(_ sequences: [[Int]], caches: [KVCache], uneditedFrom: Int? = nil) throws -> Tensor {
        precondition(sequences.count == caches.count, "one cache per sequence")
        for (tokens, cache) in zip(sequences, caches) {
            guard !tokens.isEmpty else { throw LMError.invalidInput("no tokens to run") }
            guard cache.length + tokens.count <= cache.capacity else {
                throw LMError.invalidInput("sequence of \(cache.length + tokens.count) tokens exceeds the cache of \(cache.capacity)")
            }
        }
        let rows = try PackedRows(sequences, caches: caches, spec: spec)
        let edited = uneditedFrom.map { $0 < rows.segments.count ? rows.segments[$0].row : rows.count }
        let a = run(rows, blocks: 0..<spec.layers, editedRows: edited)
        for seg in rows.segments { seg.cache?.advance(seg.count) }
        return logits(a, rows: rows.segments.map { $0.row + $0.count - 1 })
    }

    /// Sequences packed one after another into one set of rows (no padding), with their positions
    /// (continuing each cache's past). An empty sequence takes no rows.
    struct PackedRows {
        let ids: [Int32]
        let positions: [Int32]
        let segments: [Segment]

        init(_ sequences: [[Int]], caches: [KVCache]? = nil, spec: TransformerSpec) throws {
            var ids: [Int32] = [], positions: [Int32] = [], segments: [Segment] = []
            for (s, tokens) in sequences.enumerated() {
                for (i, t) in tokens.enumerated() where t < 0 || t >= spec.vocabSize {
                    throw LMError.invalidInput("token \(t) at \(i) outside the vocabulary of \(spec.vocabSize)")
                }
                let cache = caches?[s], past = cache?.length ?? 0
                guard past + tokens.count <= spec.maxPositions else {
                    throw LMError.invalidInput("sequence of \(past + tokens.count) tokens; the model takes at most \(spec.maxPositions)")
                }
                segments.append(Segment(cache: cache, row: ids.count, count: tokens.count))
                ids += tokens.map(Int32.init)
                positions += (0..<tokens.count).map { Int32(past + $0) }
            }
            self.ids = ids; self.positions = positions; self.segments = segments
        }

        var count: Int { ids.count }
    }

    /// Packed rows through `blocks`; the stream entering the first of them is the embeddings (from block 0)
    /// or `input` [rows, hidden]. The stream leaving the last is `residual[blocks.upperBound]`.
    /// `stoppingAt`: the last block stops once its stream at that site is normalised (what `siteRows` reads).
    func run(_ rows: PackedRows, blocks: Range<Int>, input: Tensor? = nil, editedRows: Int? = nil,
             stoppingAt site: RouteSite? = nil) -> Activations {
        let N = rows.count, C = spec.hidden
        let a = Activations(spec: spec, B: 1, T: N, qkvOuts: layers[0].qkv.map(\.outFeatures), mlpInCount: layers[0].mlpIn.count,
                            cached: true)
        if let input {
            precondition(input.shape == [N, C], "input stream \(input.shape) for \(N) rows")
            a.residual[blocks.lowerBound].data.update(from: input.data, count: N * C)
        } else {
            precondition(blocks.lowerBound == 0, "the embeddings enter block 0")
            embed(into: a.residual[0], ids: rows.ids, positions: rows.positions)
        }
        precondition(router.map { $0.layer >= blocks.lowerBound } ?? true,
                     "a run from block \(blocks.lowerBound) starts above the router's block")
        let batch = TokenBatch(ids: rows.ids, B: 1, T: N, mask: nil, positions: rows.positions)
        for l in blocks {
            forwardLayer(l, layers[l], a, batch: batch, segments: rows.segments, editedRows: editedRows,
                         stoppingAt: l == blocks.upperBound - 1 ? site : nil)
        }
        return a
    }

    /// The logits [rows.count, vocab] at some rows of a packed run through every block.
    func logits(_ a: Activations, rows: [Int]) -> Tensor {
        let C = spec.hidden, R = rows.count
        let picked = Tensor(shape: [R, C])
        for (i, r) in rows.enumerated() { (picked.data + i * C).update(from: a.residual[spec.layers].data + r * C, count: C) }
        let lnf = Tensor(shape: [R, C]), mean = Tensor(shape: [R]), rstd = Tensor(shape: [R])
        return finishForward(picked, lnf: lnf, mean: mean, rstd: rstd, logits: Tensor(shape: [R, spec.vocabSize]), N: R)
    }

    /// Greedy decoding with a key/value cache: the prompt followed by up to `maxNewTokens` argmax tokens,
    /// stopping early at `stop` (e.g. the end-of-sequence id).
    public func generateGreedy(prompt: [Int], maxNewTokens: Int, stop: Int? = nil) throws -> [Int] {
        try generateGreedy(prompts: [prompt], maxNewTokens: maxNewTokens, stop: stop)[0]
    }

    /// Greedy decoding of several prompts together: the prompts run packed through one forward, then each
    /// step runs one token of every sequence still going; a sequence stops at `stop`, after `maxNewTokens`
    /// or at the model's context. Each result is what `generateGreedy(prompt:)` gives for its prompt alone.
    /// Prompts go `chunk` at a time.
    public func generateGreedy(prompts: [[Int]], maxNewTokens: Int, stop: Int? = nil, chunk: Int = 64) throws -> [[Int]] {
        try generateGreedy(prompts.map { GreedyRequest(prompt: $0, maxNewTokens: maxNewTokens, stop: stop) }, chunk: chunk)
    }

    /// The same with each prompt's own length and stop token.
    public func generateGreedy(_ requests: [GreedyRequest], chunk: Int = 64) throws -> [[Int]] {
        try inChunks(requests, chunk: chunk) { try generateGreedyChunk($0, uneditedFrom: nil) }
    }

    /// Greedy decoding of each prompt by the edited model and by the unedited one in the same steps (the
    /// unedited copies' rows skip the edits), so a step reads the weights once for both. Each result is
    /// what `generateGreedy` gives for its prompt, with the edits and within `withoutEdits`.
    public func generateGreedyEditedAndUnedited(prompts: [[Int]], maxNewTokens: Int, stop: Int? = nil,
                                                chunk: Int = 32) throws -> (edited: [[Int]], unedited: [[Int]]) {
        try generateGreedyEditedAndUnedited(prompts.map { GreedyRequest(prompt: $0, maxNewTokens: maxNewTokens, stop: stop) }, chunk: chunk)
    }

    /// The same with each prompt's own length and stop token.
    public func generateGreedyEditedAndUnedited(_ requests: [GreedyRequest], chunk: Int = 32) throws -> (edited: [[Int]], unedited: [[Int]]) {
        let pairs = try inChunks(requests, chunk: chunk) { part in
            let both = try generateGreedyChunk(part + part, uneditedFrom: part.count)
            return Array(zip(both.prefix(part.count), both.suffix(part.count)))
        }
        return (pairs.map(\.0), pairs.map(\.1))
    }

    /// Runs `decode` over chunks of at most `chunk` requests, the longest first (a chunk runs as many steps
    /// as its longest request, so long requests are decoded together rather than one in every chunk), and
    /// returns each request's result in the order given.
    func inChunks<R>(_ requests: [GreedyRequest], chunk: Int, _ decode: ([GreedyRequest]) throws -> [R]) rethrows -> [R] {
        let order = requests.indices.sorted { (requests[$0].maxNewTokens, $1) > (requests[$1].maxNewTokens, $0) }
        var out: [R?] = Array(repeating: nil, count: requests.count)
        var start = 0
        while start < order.count {
            let indices = Array(order[start..<min(start + max(1, chunk), order.count)])
            start += indices.count
            for (i, r) in zip(indices, try decode(indices.map { requests[$0] })) { out[i] = r }
        }
        return out.map { $0! }
    }

    private func generateGreedyChunk(_ requests: [GreedyRequest], uneditedFrom: Int?) throws -> [[Int]] {
        let caches = requests.map { makeCache(capacity: min($0.prompt.count + $0.maxNewTokens, spec.maxPositions)) }
        var out = requests.map(\.prompt)
        var running = requests.indices.filter { requests[$0].maxNewTokens > 0 }
        guard !running.isEmpty else { return out }
        // Among the running sequences (kept in order), those before this position run with the edits.
        func split() -> Int? { uneditedFrom.map { u in running.firstIndex { $0 >= u } ?? running.count } }
        var logits = try forwardCached(running.map { out[$0] }, caches: running.map { caches[$0] }, uneditedFrom: split())
        while true {
            let next = logits.argmaxRows()
            var still: [Int] = []
            for (row, i) in running.enumerated() {
                out[i].append(next[row])
                let r = requests[i]
                if next[row] != r.stop && out[i].count - r.prompt.count < r.maxNewTokens && caches[i].length < caches[i].capacity {
                    still.append(i)
                }
            }
            running = still
            if running.isEmpty { break }
            logits = try forwardCached(running.map { [out[$0].last!] }, caches: running.map { caches[$0] }, uneditedFrom: split())
        }
        return out
    }
}

/// One prompt of a greedy decode: at most `maxNewTokens` tokens after it, stopping after `stop` (nil: never).
public struct GreedyRequest: Sendable, Equatable {
    public var prompt: [Int]
    public var maxNewTokens: Int
    public var stop: Int?

    public init(prompt: [Int], maxNewTokens: Int, stop: Int?) {
        self.prompt = prompt
        self.maxNewTokens = maxNewTokens
        self.stop = stop
    }
}

extension TokenBatch {
    /// Explicit positions (a sequence continuing a cache).
    init(ids: [Int32], B: Int, T: Int, mask: [Float]?, positions: [Int32]) {
        self.B = B; self.T = T; self.ids = ids; self.mask = mask; self.positions = positions
    }
}
