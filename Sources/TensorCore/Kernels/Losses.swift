import Foundation

extension Kernels {
    /// Masked cross-entropy from logits: `losses[n] = −mask[n]·log softmax(logits[n])[labels[n]]`.
    /// When `dlogits` is given, adds `gradScale · mask[n] · (softmax − onehot)` into it (fused).
    /// Labels < 0 count as masked. Returns Σ losses (and Σ mask through `maskSum`).
    @discardableResult
    public static func crossEntropy(
        losses: UnsafeMutablePointer<Float>?, dlogits: UnsafeMutablePointer<Float>?,
        logits: UnsafePointer<Float>, labels: UnsafePointer<Int32>, mask: UnsafePointer<Float>?,
        N: Int, V: Int, gradScale: Float = 1
    ) -> (sum: Float, maskSum: Float) {
        let rowLoss = UnsafeMutablePointer<Float>.allocate(capacity: max(N, 1))
        let rowMask = UnsafeMutablePointer<Float>.allocate(capacity: max(N, 1))
        defer { rowLoss.deallocate(); rowMask.deallocate() }
        Parallel.forChunks(N, costPerItem: 6 * V) { range in
            let e = UnsafeMutablePointer<Float>.allocate(capacity: V)
            defer { e.deallocate() }
            for n in range {
                let label = Int(labels[n])
                let m: Float = label < 0 ? 0 : (mask?[n] ?? 1)
                rowMask[n] = m
                if m == 0 { rowLoss[n] = 0; losses?[n] = 0; continue }
                let x = logits + n * V
                let mx = FastMath.max(x, count: V)
                let s = FastMath.expShiftSum(e, x, count: V, shift: mx)
                let lse = mx + logf(s)
                let l = m * (lse - x[label])
                rowLoss[n] = l
                losses?[n] = l
                if let dlogits {
                    let d = dlogits + n * V
                    let k = gradScale * m / s
                    for v in 0..<V { d[v] += k * e[v] }
                    d[label] -= gradScale * m
                }
            }
        }
        var total: Float = 0, maskSum: Float = 0
        for n in 0..<N { total += rowLoss[n]; maskSum += rowMask[n] }
        return (total, maskSum)
    }

    /// Masked KL(P_ref ‖ Q) per row, with P_ref = softmax(refLogits) (held fixed) and Q = softmax(logits).
    /// When `dlogits` is given, adds `gradScale · mask[n] · (Q − P_ref)`. Returns Σ over rows and Σ mask.
    @discardableResult
    public static func klDivergence(
        rows: UnsafeMutablePointer<Float>?, dlogits: UnsafeMutablePointer<Float>?,
        logits: UnsafePointer<Float>, refLogits: UnsafePointer<Float>, mask: UnsafePointer<Float>?,
        N: Int, V: Int, gradScale: Float = 1
    ) -> (sum: Float, maskSum: Float) {
        let rowKL = UnsafeMutablePointer<Float>.allocate(capacity: max(N, 1))
        defer { rowKL.deallocate() }
        Parallel.forChunks(N, costPerItem: 12 * V) { range in
            for n in range {
                let m = mask?[n] ?? 1
                if m == 0 { rowKL[n] = 0; rows?[n] = 0; continue }
                let q = logits + n * V, p = refLogits + n * V
                var mq = -Float.infinity, mp = -Float.infinity
                for v in 0..<V { mq = max(mq, q[v]); mp = max(mp, p[v]) }
                var sq: Float = 0, sp: Float = 0
                for v in 0..<V { sq += expf(q[v] - mq); sp += expf(p[v] - mp) }
                let lseQ = mq + logf(sq), lseP = mp + logf(sp)
                var kl: Float = 0
                for v in 0..<V {
                    let logP = p[v] - lseP
                    let pv = expf(logP)
                    kl += pv * (logP - (q[v] - lseQ))
                }
                rowKL[n] = m * kl
                rows?[n] = m * kl
                if let dlogits {
                    let d = dlogits + n * V
                    let k = gradScale * m
                    for v in 0..<V { d[v] += k * (expf(q[v] - lseQ) - expf(p[v] - lseP)) }
                }
            }
        }
        var total: Float = 0, maskSum: Float = 0
        for n in 0..<N { total += rowKL[n]; maskSum += mask?[n] ?? 1 }
        return (total, maskSum)
    }
}
