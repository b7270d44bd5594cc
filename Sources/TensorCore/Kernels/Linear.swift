/// Forward and backward kernels on raw buffers, llm.c style: outputs first, then inputs, then
/// dimensions; backward functions *add* into gradient buffers.
public enum Kernels {}

/// How a linear layer's weight is stored.
public enum WeightLayout: Sendable {
    /// `[out, in]`: `torch.nn.Linear` (Llama, the DAFNet auxiliary network).
    case outIn
    /// `[in, out]`: GPT-2's `Conv1D`.
    case inOut
}

extension Kernels {
    /// out[N, OC] = inp[N, C] · Wᵀ + bias (bias optional).
    public static func linearForward(
        _ out: UnsafeMutablePointer<Float>,
        _ inp: UnsafePointer<Float>, _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
        N: Int, C: Int, OC: Int, layout: WeightLayout = .outIn
    ) {
        if let bias {
            for n in 0..<N { (out + n * OC).update(from: bias, count: OC) }
        }
        BLAS.gemm(out, inp, weight, M: N, N: OC, K: C, transB: layout == .outIn, beta: bias == nil ? 0 : 1)
    }

    /// out[N, OC] = inp[N, C] · Wᵀ + bias for W stored `[out, in]`, each row's result computed the same way
    /// whatever N is (a fixed order of sums per row): rows projected a few at a time, as they arrive, equal
    /// the same rows projected all at once. Reads each weight row once per tile of four input rows, so a
    /// handful of rows costs one pass over W (a matrix-vector product per row would read W per row).
    public static func linearRowwise(
        _ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
        _ bias: UnsafePointer<Float>?, N: Int, C: Int, OC: Int
    ) {
        typealias V = SIMD8<Float>
        let blocks = C / 16
        @inline(__always) func load(_ p: UnsafePointer<Float>) -> V { UnsafeRawPointer(p).loadUnaligned(as: V.self) }
        // Each row's dot product with a weight row: two 8-wide partial sums over 16-wide blocks, added,
        // then the tail — the same order whichever rows share the pass.
        @inline(__always) func finish(_ a0: V, _ a1: V, _ w: UnsafePointer<Float>, _ x: UnsafePointer<Float>) -> Float {
            var s = (a0 + a1).sum()
            for c in (blocks * 16)..<C { s += w[c] * x[c] }
            return s
        }
        var n0 = 0
        while n0 + 4 <= N {
            // Four rows at a time: each weight block is loaded once for the four.
            let x0 = inp + n0 * C, x1 = x0 + C, x2 = x1 + C, x3 = x2 + C
            for o in 0..<OC {
                let w = weight + o * C
                var a00 = V(repeating: 0), a01 = V(repeating: 0), a10 = V(repeating: 0), a11 = V(repeating: 0)
                var a20 = V(repeating: 0), a21 = V(repeating: 0), a30 = V(repeating: 0), a31 = V(repeating: 0)
                for k in 0..<blocks {
                    let c = k * 16
                    let w0 = load(w + c), w1 = load(w + c + 8)
                    a00 += w0 * load(x0 + c); a01 += w1 * load(x0 + c + 8)
                    a10 += w0 * load(x1 + c); a11 += w1 * load(x1 + c + 8)
                    a20 += w0 * load(x2 + c); a21 += w1 * load(x2 + c + 8)
                    a30 += w0 * load(x3 + c); a31 += w1 * load(x3 + c + 8)
                }
                let b = bias?[o] ?? 0
                out[n0 * OC + o] = b + finish(a00, a01, w, x0)
                out[(n0 + 1) * OC + o] = b + finish(a10, a11, w, x1)
                out[(n0 + 2) * OC + o] = b + finish(a20, a21, w, x2)
                out[(n0 + 3) * OC + o] = b + finish(a30, a31, w, x3)
            }
            n0 += 4
        }
        // The last rows (fewer than four) side by side, each with its own two sums as above: a row's
        // arithmetic is the same, and the rows' independent sums keep the multiply units busy (one row
        // alone is bound by the latency of its two chains). Missing rows repeat the first, unstored.
        let left = N - n0
        if left > 0 {
            let x0 = inp + n0 * C, x1 = left > 1 ? x0 + C : x0, x2 = left > 2 ? x0 + 2 * C : x0
            for o in 0..<OC {
                let w = weight + o * C
                var a00 = V(repeating: 0), a01 = V(repeating: 0), a10 = V(repeating: 0), a11 = V(repeating: 0)
                var a20 = V(repeating: 0), a21 = V(repeating: 0)
                for k in 0..<blocks {
                    let c = k * 16
                    let w0 = load(w + c), w1 = load(w + c + 8)
                    a00 += w0 * load(x0 + c); a01 += w1 * load(x0 + c + 8)
                    a10 += w0 * load(x1 + c); a11 += w1 * load(x1 + c + 8)
                    a20 += w0 * load(x2 + c); a21 += w1 * load(x2 + c + 8)
                }
                let b = bias?[o] ?? 0
                out[n0 * OC + o] = b + finish(a00, a01, w, x0)
                if left > 1 { out[(n0 + 1) * OC + o] = b + finish(a10, a11, w, x1) }
                if left > 2 { out[(n0 + 2) * OC + o] = b + finish(a20, a21, w, x2) }
            }
        }
    }

    /// Adds the gradients of `linearForward`: dinp += dout · W, dweight += doutᵀ · inp (layout-aware),
    /// dbias += Σ_n dout. Any of the gradient outputs may be nil.
    public static func linearBackward(
        dinp: UnsafeMutablePointer<Float>?, dweight: UnsafeMutablePointer<Float>?, dbias: UnsafeMutablePointer<Float>?,
        dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        N: Int, C: Int, OC: Int, layout: WeightLayout = .outIn
    ) {
        if let dinp {
            // dinp[N, C] += dout[N, OC] · W[OC, C]   (outIn)   or dout · W[C, OC]ᵀ   (inOut)
            BLAS.gemm(dinp, dout, weight, M: N, N: C, K: OC, transB: layout == .inOut, beta: 1)
        }
        if let dweight {
            switch layout {
            case .outIn: // dW[OC, C] += doutᵀ[OC, N] · inp[N, C]
                BLAS.gemm(dweight, dout, inp, M: OC, N: C, K: N, transA: true, beta: 1)
            case .inOut: // dW[C, OC] += inpᵀ[C, N] · dout[N, OC]
                BLAS.gemm(dweight, inp, dout, M: C, N: OC, K: N, transA: true, beta: 1)
            }
        }
        if let dbias {
            for n in 0..<N {
                let row = dout + n * OC
                for o in 0..<OC { dbias[o] += row[o] }
            }
        }
    }

    /// out[N, C] = wte[ids[n], :] (+ wpe[pos[n], :] when given).
    public static func embeddingForward(
        _ out: UnsafeMutablePointer<Float>, ids: UnsafePointer<Int32>, table: UnsafePointer<Float>,
        N: Int, C: Int
    ) {
        for n in 0..<N { (out + n * C).update(from: table + Int(ids[n]) * C, count: C) }
    }

    /// dtable[ids[n], :] += dout[n, :]
    public static func embeddingBackward(
        dtable: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, ids: UnsafePointer<Int32>,
        N: Int, C: Int
    ) {
        for n in 0..<N {
            let d = dtable + Int(ids[n]) * C
            let g = dout + n * C
            for c in 0..<C { d[c] += g[c] }
        }
    }
}
