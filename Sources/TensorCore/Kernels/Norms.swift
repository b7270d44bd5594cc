import Foundation

extension Kernels {
    /// LayerNorm over the last dimension: out = (x − mean) · rstd · weight + bias.
    /// Saves `mean[N]` and `rstd[N]` for the backward pass (either may be nil at inference).
    public static func layerNormForward(
        _ out: UnsafeMutablePointer<Float>, mean: UnsafeMutablePointer<Float>?, rstd: UnsafeMutablePointer<Float>?,
        _ inp: UnsafePointer<Float>, weight: UnsafePointer<Float>?, bias: UnsafePointer<Float>?,
        N: Int, C: Int, eps: Float = 1e-5
    ) {
        Parallel.forChunks(N, costPerItem: 4 * C) { range in
            for n in range {
                let x = inp + n * C
                var m: Float = 0
                for c in 0..<C { m += x[c] }
                m /= Float(C)
                var v: Float = 0
                for c in 0..<C { let d = x[c] - m; v += d * d }
                v /= Float(C)
                let s = 1 / (v + eps).squareRoot()
                let o = out + n * C
                for c in 0..<C {
                    var y = (x[c] - m) * s
                    if let weight { y *= weight[c] }
                    if let bias { y += bias[c] }
                    o[c] = y
                }
                mean?[n] = m
                rstd?[n] = s
            }
        }
    }

    /// Adds LayerNorm gradients into dinp, dweight, dbias.
    public static func layerNormBackward(
        dinp: UnsafeMutablePointer<Float>, dweight: UnsafeMutablePointer<Float>?, dbias: UnsafeMutablePointer<Float>?,
        dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, weight: UnsafePointer<Float>?,
        mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>,
        N: Int, C: Int
    ) {
        // dinp rows are independent; dweight/dbias are reductions over rows: do them in one pass serially
        // per chunk into private accumulators, then sum.
        let chunks = (N * C * 6 >= Parallel.minimumWork) ? min(Parallel.cores, N) : 1
        let size = (N + chunks - 1) / max(chunks, 1)
        let partial = UnsafeMutablePointer<Float>.allocate(capacity: max(chunks, 1) * 2 * C)
        partial.initialize(repeating: 0, count: max(chunks, 1) * 2 * C)
        defer { partial.deallocate() }
        let work: (Int) -> Void = { chunk in
            let lo = chunk * size, hi = min(N, lo + size)
            if lo >= hi { return }
            let dw = partial + chunk * 2 * C
            let db = dw + C
            for n in lo..<hi {
                let x = inp + n * C, g = dout + n * C, d = dinp + n * C
                let m = mean[n], s = rstd[n]
                var dnormMean: Float = 0, dnormNormMean: Float = 0
                for c in 0..<C {
                    let norm = (x[c] - m) * s
                    let dnorm = g[c] * (weight?[c] ?? 1)
                    dnormMean += dnorm
                    dnormNormMean += dnorm * norm
                    db[c] += g[c]
                    dw[c] += norm * g[c]
                }
                dnormMean /= Float(C)
                dnormNormMean /= Float(C)
                for c in 0..<C {
                    let norm = (x[c] - m) * s
                    let dnorm = g[c] * (weight?[c] ?? 1)
                    d[c] += (dnorm - dnormMean - norm * dnormNormMean) * s
                }
            }
        }
        if chunks > 1 { DispatchQueue.concurrentPerform(iterations: chunks, execute: work) } else { work(0) }
        for chunk in 0..<chunks {
            let dw = partial + chunk * 2 * C
            let db = dw + C
            if let dweight { for c in 0..<C { dweight[c] += dw[c] } }
            if let dbias { for c in 0..<C { dbias[c] += db[c] } }
        }
    }

    /// RMSNorm over the last dimension (Llama): out = x · rrms · weight, rrms = 1/√(mean(x²) + eps).
    /// Saves `rrms[N]` for backward (may be nil at inference).
    public static func rmsNormForward(
        _ out: UnsafeMutablePointer<Float>, rrms: UnsafeMutablePointer<Float>?,
        _ inp: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        N: Int, C: Int, eps: Float = 1e-6
    ) {
        Parallel.forChunks(N, costPerItem: 3 * C) { range in
            for n in range {
                let x = inp + n * C, o = out + n * C
                var ss: Float = 0
                for c in 0..<C { ss += x[c] * x[c] }
                let r = 1 / (ss / Float(C) + eps).squareRoot()
                for c in 0..<C { o[c] = weight[c] * (x[c] * r) }
                rrms?[n] = r
            }
        }
    }

    /// Adds RMSNorm gradients into dinp and dweight.
    public static func rmsNormBackward(
        dinp: UnsafeMutablePointer<Float>, dweight: UnsafeMutablePointer<Float>?,
        dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        rrms: UnsafePointer<Float>, N: Int, C: Int
    ) {
        Parallel.forChunks(N, costPerItem: 4 * C) { range in
            for n in range {
                let x = inp + n * C, g = dout + n * C, d = dinp + n * C
                let r = rrms[n]
                // y = w·x·r; dx = r·(w·g) − x·r³·mean(w·g·x)
                var dot: Float = 0
                for c in 0..<C { dot += g[c] * weight[c] * x[c] }
                let k = dot * r * r * r / Float(C)
                for c in 0..<C { d[c] += g[c] * weight[c] * r - x[c] * k }
            }
        }
        if let dweight {
            for n in 0..<N {
                let x = inp + n * C, g = dout + n * C
                let r = rrms[n]
                for c in 0..<C { dweight[c] += g[c] * x[c] * r }
            }
        }
    }
}
