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
            forRowGroups(range) { n, rows in
                // Each row's mean and variance in the order of a plain loop (`rowSums`).
                let m = rowSums(rows, C) { r, c in inp[(n + r) * C + c] } / Float(C)
                let v = rowSums(rows, C) { r, c in let d = inp[(n + r) * C + c] - m[r]; return d * d } / Float(C)
                let s = 1 / (v + eps).squareRoot()
                for r in 0..<rows {
                    let x = inp + (n + r) * C, o = out + (n + r) * C
                    let mr = m[r], sr = s[r]
                    for c in 0..<C {
                        var y = (x[c] - mr) * sr
                        if let weight { y *= weight[c] }
                        if let bias { y += bias[c] }
                        o[c] = y
                    }
                    mean?[n + r] = mr
                    rstd?[n + r] = sr
                }
            }
        }
    }

    /// Calls `body(first, count)` over `range` in groups of eight rows (`count` 8), then the rest one by one
    /// (`count` 1).
    @inline(__always)
    static func forRowGroups(_ range: Range<Int>, _ body: (Int, Int) -> Void) {
        var n = range.lowerBound
        while n + 8 <= range.upperBound { body(n, 8); n += 8 }
        while n < range.upperBound { body(n, 1); n += 1 }
    }

    /// The sums Σ_c term(r, c) of `rows` rows (8, or 1 in lane 0), each added in the order of a plain loop
    /// (c = 0, 1, …, one float add at a time), so the result is the same bit for bit as that loop's: a replay
    /// of stored versions compares states to the bit, and versions written before must stay readable. A
    /// single chain of adds waits on each add's latency; the eight rows' chains interleave and keep the
    /// adder busy.
    @inline(__always)
    static func rowSums(_ rows: Int, _ C: Int, _ term: (Int, Int) -> Float) -> SIMD8<Float> {
        if rows < 8 {
            var s0: Float = 0
            for c in 0..<C { s0 += term(0, c) }
            return SIMD8(s0, 0, 0, 0, 0, 0, 0, 0)
        }
        var s0: Float = 0, s1: Float = 0, s2: Float = 0, s3: Float = 0
        var s4: Float = 0, s5: Float = 0, s6: Float = 0, s7: Float = 0
        for c in 0..<C {
            s0 += term(0, c); s1 += term(1, c); s2 += term(2, c); s3 += term(3, c)
            s4 += term(4, c); s5 += term(5, c); s6 += term(6, c); s7 += term(7, c)
        }
        return SIMD8(s0, s1, s2, s3, s4, s5, s6, s7)
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
            forRowGroups(range) { n, rows in
                let ss = rowSums(rows, C) { r, c in let x = inp[(n + r) * C + c]; return x * x }
                let rr = 1 / (ss / Float(C) + eps).squareRoot()
                for i in 0..<rows {
                    let x = inp + (n + i) * C, o = out + (n + i) * C, r = rr[i]
                    for c in 0..<C { o[c] = weight[c] * (x[c] * r) }
                    rrms?[n + i] = r
                }
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
