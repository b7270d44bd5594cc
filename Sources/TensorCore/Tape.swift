import Foundation

/// A value recorded on a `Tape`, with a gradient buffer allocated on first use.
public final class Variable: @unchecked Sendable {
    public let value: Tensor
    public let requiresGrad: Bool
    private var gradBuffer: Tensor?

    init(_ value: Tensor, requiresGrad: Bool, grad: Tensor? = nil) {
        self.value = value
        self.requiresGrad = requiresGrad
        self.gradBuffer = grad
    }

    public var shape: [Int] { value.shape }

    /// ∂loss/∂value, accumulated by `Tape.backward` (zeros until then).
    public var grad: Tensor {
        if let g = gradBuffer { return g }
        let g = Tensor(shape: value.shape)
        gradBuffer = g
        return g
    }

    var hasGrad: Bool { gradBuffer != nil }
}

/// A reverse-mode tape: each operation computes its value now and records how to push gradients back.
/// Networks built from these operations get gradients without a second, hand-written backward pass.
/// Backward closures *add* into the inputs' gradients, so a variable used twice sums both paths.
public final class Tape: @unchecked Sendable {
    private var backwards: [() -> Void] = []
    /// When false (inference), operations compute values only and record nothing.
    public let recording: Bool

    public init(recording: Bool = true) { self.recording = recording }

    /// Number of recorded backward steps.
    public var count: Int { backwards.count }

    /// A trainable parameter; its gradient accumulates into `parameter.grad`.
    public func parameter(_ p: Parameter) -> Variable { Variable(p.value, requiresGrad: true, grad: p.grad) }

    /// A leaf: an input that may or may not need a gradient.
    public func leaf(_ t: Tensor, requiresGrad: Bool = false) -> Variable { Variable(t, requiresGrad: requiresGrad) }

    /// Runs the recorded steps in reverse after seeding ∂/∂output with the given tensors
    /// (for a scalar loss pass `[(loss, Tensor(shape: [1], repeating: 1))]`).
    public func backward(seeds: [(Variable, Tensor)]) {
        for (v, g) in seeds { v.grad.add(g) }
        for step in backwards.reversed() { step() }
        backwards.removeAll()
    }

    /// Backward from a scalar.
    public func backward(_ loss: Variable) {
        precondition(loss.value.count == 1, "backward(_:) needs a scalar; use backward(seeds:)")
        backward(seeds: [(loss, Tensor(shape: [1], repeating: 1))])
    }

    /// Records an operation: `value` is the result; `back` runs during backward with the result variable.
    func record(_ value: Tensor, inputs: [Variable], _ back: @escaping (Variable) -> Void) -> Variable {
        let needs = recording && inputs.contains { $0.requiresGrad }
        let out = Variable(value, requiresGrad: needs)
        if needs {
            backwards.append { [unowned out] in
                if out.hasGrad { back(out) }
            }
            // keep `out` alive for the closure
            retained.append(out)
        }
        return out
    }

    private var retained: [Variable] = []
}

// MARK: - Operations

extension Tape {
    /// op(a) · op(b) for 2-D values.
    public func matmul(_ a: Variable, _ b: Variable, transA: Bool = false, transB: Bool = false) -> Variable {
        let av = a.value, bv = b.value
        let M = transA ? av.shape[1] : av.shape[0], K = transA ? av.shape[0] : av.shape[1]
        let N = transB ? bv.shape[0] : bv.shape[1]
        precondition((transB ? bv.shape[1] : bv.shape[0]) == K, "matmul: \(av.shape) · \(bv.shape)")
        let out = Tensor(shape: [M, N])
        BLAS.gemm(out.data, av.data, bv.data, M: M, N: N, K: K, transA: transA, transB: transB)
        return record(out, inputs: [a, b]) { o in
            let g = o.grad
            if a.requiresGrad {
                // dA = dC · op(B)ᵀ   (or its transpose when A is transposed)
                if transA {
                    BLAS.gemm(a.grad.data, bv.data, g.data, M: K, N: M, K: N, transA: transB, transB: true, beta: 1)
                } else {
                    BLAS.gemm(a.grad.data, g.data, bv.data, M: M, N: K, K: N, transB: !transB, beta: 1)
                }
            }
            if b.requiresGrad {
                if transB {
                    BLAS.gemm(b.grad.data, g.data, av.data, M: N, N: K, K: M, transA: true, transB: transA, beta: 1)
                } else {
                    BLAS.gemm(b.grad.data, av.data, g.data, M: K, N: N, K: M, transA: !transA, beta: 1)
                }
            }
        }
    }

    /// x[N, C] · Wᵀ + b with W stored per `layout`.
    public func linear(_ x: Variable, _ w: Variable, _ b: Variable? = nil, layout: WeightLayout = .outIn) -> Variable {
        let C = x.value.shape.last!
        let N = x.value.count / C
        let OC = layout == .outIn ? w.value.shape[0] : w.value.shape[1]
        precondition(w.value.count == C * OC, "linear: input \(x.shape) with weight \(w.shape)")
        // Filled whole: the bias rows then a product added, or a product with β = 0 (OpenBLAS sets C, never
        // scales what it held).
        let out = Tensor(uninitializedShape: Array(x.value.shape.dropLast()) + [OC])
        Kernels.linearForward(out.data, x.value.data, w.value.data, b?.value.data, N: N, C: C, OC: OC, layout: layout)
        var inputs = [x, w]
        if let b { inputs.append(b) }
        return record(out, inputs: inputs) { o in
            Kernels.linearBackward(
                dinp: x.requiresGrad ? x.grad.data : nil, dweight: w.requiresGrad ? w.grad.data : nil,
                dbias: (b?.requiresGrad ?? false) ? b!.grad.data : nil,
                dout: o.grad.data, inp: x.value.data, weight: w.value.data, N: N, C: C, OC: OC, layout: layout)
        }
    }

    /// How `b` broadcasts against `a`: the same count, a row vector over a's last dimension, or a scalar.
    private func broadcast(_ a: Tensor, _ b: Tensor) -> Int {
        if b.count == a.count { return 0 }
        if b.count == 1 { return 1 }
        precondition(b.count == a.shape.last!, "cannot broadcast \(b.shape) against \(a.shape)")
        return b.count
    }

    /// a + b, where b has a's shape, is a row vector over a's last dimension, or is a scalar.
    public func add(_ a: Variable, _ b: Variable) -> Variable { addScaled(a, b, 1) }

    /// a − b (broadcasting as `add`).
    public func sub(_ a: Variable, _ b: Variable) -> Variable { addScaled(a, b, -1) }

    private func addScaled(_ a: Variable, _ b: Variable, _ k: Float) -> Variable {
        let mode = broadcast(a.value, b.value)
        let n = a.value.count
        let out = Tensor(uninitializedShape: a.value.shape)
        let av = a.value.data, bv = b.value.data, o = out.data
        switch mode {
        case 0: for i in 0..<n { o[i] = av[i] + k * bv[i] }
        case 1: let s = k * bv[0]; for i in 0..<n { o[i] = av[i] + s }
        default: for r in stride(from: 0, to: n, by: mode) { for j in 0..<mode { o[r + j] = av[r + j] + k * bv[j] } }
        }
        return record(out, inputs: [a, b]) { out in
            let g = out.grad.data
            if a.requiresGrad { Kernels.accumulate(a.grad.data, g, count: n) }
            if b.requiresGrad {
                let d = b.grad.data
                switch mode {
                case 0: BLAS.axpy(d, g, count: n, alpha: k)
                case 1: var s: Float = 0; for i in 0..<n { s += g[i] }; d[0] += k * s
                default: for r in stride(from: 0, to: n, by: mode) { for j in 0..<mode { d[j] += k * g[r + j] } }
                }
            }
        }
    }

    /// a ⊙ b (broadcasting as `add`).
    public func mul(_ a: Variable, _ b: Variable) -> Variable {
        let mode = broadcast(a.value, b.value)
        let n = a.value.count
        let out = Tensor(shape: a.value.shape)
        let av = a.value.data, bv = b.value.data, o = out.data
        // The loops run over rows of `width` elements of a; b's index is the position in the row (mode
        // 0: b is as long as a, one row; mode 1: a scalar, read at 0).
        let width = mode == 0 ? n : (mode == 1 ? 1 : mode), bStep = mode == 0 ? 1 : (mode == 1 ? 0 : 1)
        for r in stride(from: 0, to: n, by: max(width, 1)) { for j in 0..<width { o[r + j] = av[r + j] * bv[j * bStep] } }
        return record(out, inputs: [a, b]) { out in
            let g = out.grad.data
            if a.requiresGrad {
                let d = a.grad.data
                for r in stride(from: 0, to: n, by: max(width, 1)) { for j in 0..<width { d[r + j] += g[r + j] * bv[j * bStep] } }
            }
            if b.requiresGrad {
                let d = b.grad.data
                for r in stride(from: 0, to: n, by: max(width, 1)) { for j in 0..<width { d[j * bStep] += g[r + j] * av[r + j] } }
            }
        }
    }

    /// a · k
    public func scale(_ a: Variable, _ k: Float) -> Variable {
        let out = a.value * k
        return record(out, inputs: [a]) { o in a.grad.add(o.grad, alpha: k) }
    }

    /// Rows scaled by per-row factors: out[n, :] = x[n, :] · s[n]; x [N, C], s [N].
    public func rowScale(_ x: Variable, _ s: Variable) -> Variable {
        let C = x.value.shape.last!, N = x.value.count / C
        precondition(s.value.count == N, "rowScale: \(s.shape) factors for \(N) rows")
        let out = Tensor(shape: x.value.shape)
        let xv = x.value.data, sv = s.value.data, o = out.data
        for n in 0..<N { for c in 0..<C { o[n * C + c] = xv[n * C + c] * sv[n] } }
        return record(out, inputs: [x, s]) { out in
            let g = out.grad.data
            if x.requiresGrad { let d = x.grad.data; for n in 0..<N { for c in 0..<C { d[n * C + c] += g[n * C + c] * sv[n] } } }
            if s.requiresGrad {
                let d = s.grad.data
                for n in 0..<N { var acc: Float = 0; for c in 0..<C { acc += g[n * C + c] * xv[n * C + c] }; d[n] += acc }
            }
        }
    }

    /// LayerNorm over the last dimension.
    public func layerNorm(_ x: Variable, _ w: Variable?, _ b: Variable?, eps: Float = 1e-5) -> Variable {
        let C = x.value.shape.last!, N = x.value.count / C
        let out = Tensor(uninitializedShape: x.value.shape)
        let mean = Tensor(uninitializedShape: [N]), rstd = Tensor(uninitializedShape: [N])
        Kernels.layerNormForward(out.data, mean: mean.data, rstd: rstd.data, x.value.data,
                                 weight: w?.value.data, bias: b?.value.data, N: N, C: C, eps: eps)
        return record(out, inputs: [x] + [w, b].compactMap { $0 }) { o in
            let dx = x.requiresGrad ? x.grad : Tensor(shape: x.value.shape)
            Kernels.layerNormBackward(dinp: dx.data, dweight: (w?.requiresGrad ?? false) ? w!.grad.data : nil,
                                      dbias: (b?.requiresGrad ?? false) ? b!.grad.data : nil,
                                      dout: o.grad.data, inp: x.value.data, weight: w?.value.data,
                                      mean: mean.data, rstd: rstd.data, N: N, C: C)
        }
    }

    /// RMSNorm over the last dimension.
    public func rmsNorm(_ x: Variable, _ w: Variable, eps: Float = 1e-6) -> Variable {
        let C = x.value.shape.last!, N = x.value.count / C
        let out = Tensor(shape: x.value.shape)
        let rr = Tensor(shape: [N])
        Kernels.rmsNormForward(out.data, rrms: rr.data, x.value.data, weight: w.value.data, N: N, C: C, eps: eps)
        return record(out, inputs: [x, w]) { o in
            let dx = x.requiresGrad ? x.grad : Tensor(shape: x.value.shape)
            Kernels.rmsNormBackward(dinp: dx.data, dweight: w.requiresGrad ? w.grad.data : nil, dout: o.grad.data,
                                    inp: x.value.data, weight: w.value.data, rrms: rr.data, N: N, C: C)
        }
    }

    /// Elementwise activation by kernel pair.
    private func unary(_ x: Variable,
                       _ fwd: (UnsafeMutablePointer<Float>, UnsafePointer<Float>, Int) -> Void,
                       _ bwd: @escaping (UnsafeMutablePointer<Float>, UnsafePointer<Float>, UnsafePointer<Float>, Int) -> Void) -> Variable {
        let out = Tensor(shape: x.value.shape)
        let n = out.count
        fwd(out.data, x.value.data, n)
        return record(out, inputs: [x]) { o in bwd(x.grad.data, o.grad.data, x.value.data, n) }
    }

    public func gelu(_ x: Variable) -> Variable {
        unary(x, { Kernels.geluForward($0, $1, count: $2) }, { Kernels.geluBackward(dinp: $0, dout: $1, inp: $2, count: $3) })
    }

    public func relu(_ x: Variable) -> Variable {
        unary(x, { Kernels.reluForward($0, $1, count: $2) }, { Kernels.reluBackward(dinp: $0, dout: $1, inp: $2, count: $3) })
    }

    public func silu(_ x: Variable) -> Variable {
        unary(x, { Kernels.siluForward($0, $1, count: $2) }, { Kernels.siluBackward(dinp: $0, dout: $1, inp: $2, count: $3) })
    }

    public func clamp(_ x: Variable, min lo: Float, max hi: Float) -> Variable {
        unary(x, { Kernels.clampForward($0, $1, lo: lo, hi: hi, count: $2) },
              { Kernels.clampBackward(dinp: $0, dout: $1, inp: $2, lo: lo, hi: hi, count: $3) })
    }

    public func sigmoid(_ x: Variable) -> Variable {
        let out = Tensor(shape: x.value.shape)
        let n = out.count, o = out.data, xv = x.value.data
        for i in 0..<n { o[i] = 1 / (1 + expf(-xv[i])) }
        return record(out, inputs: [x]) { r in
            let g = r.grad.data, d = x.grad.data
            for i in 0..<n { d[i] += g[i] * o[i] * (1 - o[i]) }
        }
    }

    public func exp(_ x: Variable) -> Variable {
        let out = Tensor(shape: x.value.shape)
        let n = out.count, o = out.data, xv = x.value.data
        for i in 0..<n { o[i] = expf(xv[i]) }
        return record(out, inputs: [x]) { r in
            let g = r.grad.data, d = x.grad.data
            for i in 0..<n { d[i] += g[i] * o[i] }
        }
    }

    /// Softmax over the last dimension.
    public func softmax(_ x: Variable) -> Variable {
        let C = x.value.shape.last!, N = x.value.count / C
        let out = Tensor(shape: x.value.shape)
        Kernels.softmaxForward(out.data, x.value.data, N: N, C: C)
        return record(out, inputs: [x]) { o in
            Kernels.softmaxBackward(dinp: x.grad.data, dout: o.grad.data, out: out.data, N: N, C: C)
        }
    }

    /// Log-softmax over the last dimension.
    public func logSoftmax(_ x: Variable) -> Variable {
        let C = x.value.shape.last!, N = x.value.count / C
        let out = Tensor(shape: x.value.shape)
        Kernels.logSoftmaxForward(out.data, x.value.data, N: N, C: C)
        return record(out, inputs: [x]) { o in
            Kernels.logSoftmaxBackward(dinp: x.grad.data, dout: o.grad.data, out: out.data, N: N, C: C)
        }
    }

    /// Sum of all elements, a scalar [1].
    public func sum(_ x: Variable) -> Variable {
        let out = Tensor(shape: [1], repeating: x.value.sum())
        let n = x.value.count
        return record(out, inputs: [x]) { o in
            let g = o.grad[0], d = x.grad.data
            for i in 0..<n { d[i] += g }
        }
    }

    /// Mean of all elements, a scalar [1].
    public func mean(_ x: Variable) -> Variable { scale(sum(x), 1 / Float(x.value.count)) }

    /// Sum over the first dimension: [N, C] → [C].
    public func sumRows(_ x: Variable) -> Variable {
        let C = x.value.shape.last!, N = x.value.count / C
        let out = Tensor(shape: [C])
        for n in 0..<N { for c in 0..<C { out.data[c] += x.value.data[n * C + c] } }
        return record(out, inputs: [x]) { o in
            let g = o.grad.data, d = x.grad.data
            for n in 0..<N { for c in 0..<C { d[n * C + c] += g[c] } }
        }
    }

    /// Sum over the last dimension: [N, C] → [N].
    public func sumLast(_ x: Variable) -> Variable {
        let C = x.value.shape.last!, N = x.value.count / C
        let out = Tensor(shape: [N])
        for n in 0..<N { var s: Float = 0; for c in 0..<C { s += x.value.data[n * C + c] }; out.data[n] = s }
        return record(out, inputs: [x]) { o in
            let g = o.grad.data, d = x.grad.data
            for n in 0..<N { for c in 0..<C { d[n * C + c] += g[n] } }
        }
    }

    /// Same values, another shape.
    public func reshape(_ x: Variable, _ shape: [Int]) -> Variable {
        let out = x.value.reshaped(shape)
        return record(out, inputs: [x]) { o in x.grad.add(o.grad) }
    }

    /// 2-D transpose.
    public func transpose(_ x: Variable) -> Variable {
        let out = x.value.transposed()
        return record(out, inputs: [x]) { o in x.grad.add(o.grad.transposed()) }
    }

    /// Rows `range` of a [N, …] value (a copy).
    public func rows(_ x: Variable, _ range: Range<Int>) -> Variable {
        let out = x.value.rows(range).copy()
        return record(out, inputs: [x]) { o in x.grad.rows(range).add(o.grad) }
    }

    /// Rows of several values stacked: [N1, C] ++ [N2, C] → [N1 + N2, C].
    public func concatRows(_ xs: [Variable]) -> Variable {
        let C = xs[0].value.shape.last!
        let rows = xs.map { $0.value.count / C }
        let out = Tensor.concatenatingRows(xs.map(\.value))
        return record(out, inputs: xs) { o in
            var at = 0
            for (x, r) in zip(xs, rows) {
                if x.requiresGrad { BLAS.axpy(x.grad.data, o.grad.data + at * C, count: r * C, alpha: 1) }
                at += r
            }
        }
    }

    /// Columns `range` of a [N, C] value (a copy).
    public func columns(_ x: Variable, _ range: Range<Int>) -> Variable {
        let C = x.value.shape.last!, N = x.value.count / C, W = range.count
        let out = x.value.columnSlice(range)
        return record(out, inputs: [x]) { o in
            let g = o.grad.data, d = x.grad.data
            for n in 0..<N { BLAS.axpy(d + n * C + range.lowerBound, g + n * W, count: W, alpha: 1) }
        }
    }

    /// Columns of several [N, Ci] values side by side → [N, ΣCi].
    public func concatColumns(_ xs: [Variable]) -> Variable {
        let N = xs[0].value.shape[0]
        let widths = xs.map { $0.value.count / N }
        let W = widths.reduce(0, +)
        let out = Tensor(shape: [N, W])
        var at = 0
        for (x, w) in zip(xs, widths) {
            for n in 0..<N { (out.data + n * W + at).update(from: x.value.data + n * w, count: w) }
            at += w
        }
        return record(out, inputs: xs) { o in
            var at = 0
            for (x, w) in zip(xs, widths) {
                if x.requiresGrad {
                    let d = x.grad.data, g = o.grad.data
                    for n in 0..<N { for j in 0..<w { d[n * w + j] += g[n * W + at + j] } }
                }
                at += w
            }
        }
    }

    /// A value with its gradient cut (like `detach()`).
    public func detach(_ x: Variable) -> Variable { Variable(x.value, requiresGrad: false) }
}

extension Tape {
    /// Causal multi-head attention on packed q [B·T, NH·HS], k, v [B·T, NKV·HS] → [B·T, NH·HS].
    public func attention(q: Variable, k: Variable, v: Variable, keyMask: Tensor? = nil,
                          B: Int, T: Int, NH: Int, NKV: Int? = nil) -> Variable {
        let HS = q.value.count / (B * T * NH)
        let s = AttentionShape(B: B, T: T, NH: NH, NKV: NKV, HS: HS)
        let out = Tensor(shape: [B * T, NH * HS])
        let probs = Tensor(shape: [B, NH, T, T])
        Kernels.attentionForward(out.data, probs: probs.data, q: q.value.data, k: k.value.data, v: v.value.data,
                                 keyMask: keyMask?.data, s)
        return record(out, inputs: [q, k, v]) { o in
            Kernels.attentionBackward(dq: q.grad.data, dk: k.grad.data, dv: v.grad.data, dout: o.grad.data,
                                      probs: probs.data, q: q.value.data, k: k.value.data, v: v.value.data, s)
        }
    }

    /// Masked cross-entropy of logits [N, V] against labels, summed (`mean: false`) or divided by Σ mask.
    public func crossEntropy(_ logits: Variable, labels: [Int32], mask: [Float]? = nil, mean: Bool = false) -> Variable {
        let V = logits.value.shape.last!, N = logits.value.count / V
        precondition(labels.count == N && (mask?.count ?? N) == N, "crossEntropy: \(N) rows")
        let (total, maskSum) = labels.withUnsafeBufferPointer { l in
            Kernels.crossEntropy(losses: nil, dlogits: nil, logits: logits.value.data, labels: l.baseAddress!,
                                 mask: mask, N: N, V: V)
        }
        let denom: Float = mean ? max(maskSum, 1) : 1
        let out = Tensor(shape: [1], repeating: total / denom)
        return record(out, inputs: [logits]) { o in
            labels.withUnsafeBufferPointer { l in
                _ = Kernels.crossEntropy(losses: nil, dlogits: logits.grad.data, logits: logits.value.data,
                                         labels: l.baseAddress!, mask: mask, N: N, V: V, gradScale: o.grad[0] / denom)
            }
        }
    }
}

// MARK: - Segment operations (variable-length groups of rows, e.g. the tokens of each edit)

extension Tape {
    /// Softmax of a score per row within each segment of consecutive rows: scores [L] or [L, 1] → [L].
    public func segmentSoftmax(_ scores: Variable, lengths: [Int]) -> Variable {
        let L = scores.value.count
        precondition(lengths.reduce(0, +) == L && lengths.allSatisfy { $0 > 0 }, "segment lengths \(lengths) for \(L) rows")
        let out = Tensor(shape: [L])
        var start = 0
        for n in lengths {
            Kernels.softmaxForward(out.data + start, scores.value.data + start, N: 1, C: n)
            start += n
        }
        return record(out, inputs: [scores]) { o in
            var start = 0
            for n in lengths {
                Kernels.softmaxBackward(dinp: scores.grad.data + start, dout: o.grad.data + start, out: out.data + start, N: 1, C: n)
                start += n
            }
        }
    }

    /// Sum of the rows of each segment: [L, d] → [segments, d].
    public func segmentSum(_ x: Variable, lengths: [Int]) -> Variable {
        let d = x.value.shape.last!, L = x.value.count / d
        precondition(lengths.reduce(0, +) == L, "segment lengths \(lengths) for \(L) rows")
        let out = Tensor(shape: [lengths.count, d])
        var row = 0
        for (s, n) in lengths.enumerated() {
            for _ in 0..<n { BLAS.axpy(out.data + s * d, x.value.data + row * d, count: d, alpha: 1); row += 1 }
        }
        return record(out, inputs: [x]) { o in
            var row = 0
            for (s, n) in lengths.enumerated() {
                for _ in 0..<n { BLAS.axpy(x.grad.data + row * d, o.grad.data + s * d, count: d, alpha: 1); row += 1 }
            }
        }
    }

    /// Each row repeated as many times as its segment is long: [segments, d] → [L, d] (`repeat_interleave`).
    public func repeatSegments(_ x: Variable, lengths: [Int]) -> Variable {
        let d = x.value.shape.last!
        precondition(x.value.count / d == lengths.count, "\(lengths.count) segments for \(x.shape)")
        let L = lengths.reduce(0, +)
        let out = Tensor(uninitializedShape: [L, d])
        var row = 0
        for (s, n) in lengths.enumerated() {
            for _ in 0..<n { (out.data + row * d).update(from: x.value.data + s * d, count: d); row += 1 }
        }
        return record(out, inputs: [x]) { o in
            var row = 0
            for (s, n) in lengths.enumerated() {
                for _ in 0..<n { BLAS.axpy(x.grad.data + s * d, o.grad.data + row * d, count: d, alpha: 1); row += 1 }
            }
        }
    }
}
