import Foundation

extension Kernels {
    /// Row-wise softmax over the last dimension C. `out` may alias `inp`.
    public static func softmaxForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, N: Int, C: Int) {
        Parallel.forChunks(N, costPerItem: 8 * C) { range in
            for n in range {
                let x = inp + n * C, o = out + n * C
                let m = FastMath.max(x, count: C)
                if m == -.infinity { o.update(repeating: 0, count: C); continue }
                let s = FastMath.expShiftSum(o, x, count: C, shift: m)
                let inv = 1 / s
                for c in 0..<C { o[c] *= inv }
            }
        }
    }

    /// dinp += y ⊙ (dout − Σ dout⊙y), with y the softmax output.
    public static func softmaxBackward(dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, out: UnsafePointer<Float>, N: Int, C: Int) {
        Parallel.forChunks(N, costPerItem: 4 * C) { range in
            for n in range {
                let y = out + n * C, g = dout + n * C, d = dinp + n * C
                var dot: Float = 0
                for c in 0..<C { dot += y[c] * g[c] }
                for c in 0..<C { d[c] += y[c] * (g[c] - dot) }
            }
        }
    }

    /// Row-wise log-softmax. `out` may alias `inp`.
    public static func logSoftmaxForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, N: Int, C: Int) {
        Parallel.forChunks(N, costPerItem: 8 * C) { range in
            for n in range {
                let x = inp + n * C, o = out + n * C
                var m = -Float.infinity
                for c in 0..<C { m = max(m, x[c]) }
                var s: Float = 0
                for c in 0..<C { s += expf(x[c] - m) }
                let lse = m + logf(s)
                for c in 0..<C { o[c] = x[c] - lse }
            }
        }
    }

    /// dinp += dout − softmax · Σ dout, with `out` the log-softmax output.
    public static func logSoftmaxBackward(dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, out: UnsafePointer<Float>, N: Int, C: Int) {
        Parallel.forChunks(N, costPerItem: 6 * C) { range in
            for n in range {
                let y = out + n * C, g = dout + n * C, d = dinp + n * C
                var s: Float = 0
                for c in 0..<C { s += g[c] }
                for c in 0..<C { d[c] += g[c] - expf(y[c]) * s }
            }
        }
    }
}
