import Foundation

/// Strides and sizes of a causal multi-head attention call with grouped key/value heads.
public struct AttentionShape: Sendable {
    public var B: Int, T: Int, NH: Int, NKV: Int, HS: Int
    /// Element distance between consecutive positions in q, k, v and out (defaults: packed [B, T, heads, HS]).
    public var qStride: Int, kStride: Int, vStride: Int, outStride: Int
    public var scale: Float

    public init(B: Int, T: Int, NH: Int, NKV: Int? = nil, HS: Int,
                qStride: Int? = nil, kStride: Int? = nil, vStride: Int? = nil, outStride: Int? = nil,
                scale: Float? = nil) {
        let kv = NKV ?? NH
        precondition(NH % kv == 0, "query heads \(NH) not a multiple of key/value heads \(kv)")
        self.B = B; self.T = T; self.NH = NH; self.NKV = kv; self.HS = HS
        self.qStride = qStride ?? NH * HS
        self.kStride = kStride ?? kv * HS
        self.vStride = vStride ?? kv * HS
        self.outStride = outStride ?? NH * HS
        self.scale = scale ?? 1 / Float(HS).squareRoot()
    }
}

extension Kernels {
    /// Causal attention: out[b,t,h,:] = Σ_{s≤t, keyMask[b,s]≠0} softmax_s(scale·q·k) v.
    /// q: [B, T, NH, HS]; k, v: [B, T, NKV, HS] (query head h reads kv head h / (NH/NKV)); strides per position.
    /// Saves the probabilities `probs` [B, NH, T, T] for the backward pass. A query row with no visible
    /// key (a padded position with left padding) gets zero output.
    public static func attentionForward(
        _ out: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>,
        q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
        keyMask: UnsafePointer<Float>?, _ s: AttentionShape
    ) {
        let T = s.T, HS = s.HS, group = s.NH / s.NKV
        for b in 0..<s.B {
            for h in 0..<s.NH {
                let g = h / group
                let qh = q + b * T * s.qStride + h * HS
                let kg = k + b * T * s.kStride + g * HS
                let vg = v + b * T * s.vStride + g * HS
                let P = probs + (b * s.NH + h) * T * T
                // S = scale · Q Kᵀ
                BLAS.gemm(P, qh, kg, M: T, N: T, K: HS, transB: true, alpha: s.scale, lda: s.qStride, ldb: s.kStride)
                let mask = keyMask.map { $0 + b * T }
                Parallel.forChunks(T, costPerItem: 8 * T) { rows in
                    for t in rows { maskedSoftmaxRow(P + t * T, visible: t + 1, T: T, keyMask: mask) }
                }
                let oh = out + b * T * s.outStride + h * HS
                BLAS.gemm(oh, P, vg, M: T, N: HS, K: T, ldb: s.vStride, ldc: s.outStride)
            }
        }
    }

    @inline(__always)
    static func maskedSoftmaxRow(_ row: UnsafeMutablePointer<Float>, visible: Int, T: Int, keyMask: UnsafePointer<Float>?) {
        var mx = -Float.infinity
        for j in 0..<visible where keyMask?[j] ?? 1 != 0 { mx = max(mx, row[j]) }
        if mx == -.infinity {
            row.update(repeating: 0, count: T)
            return
        }
        var sum: Float = 0
        for j in 0..<visible {
            if keyMask?[j] ?? 1 != 0 {
                let e = expf(row[j] - mx)
                row[j] = e
                sum += e
            } else {
                row[j] = 0
            }
        }
        let inv = 1 / sum
        for j in 0..<visible { row[j] *= inv }
        for j in visible..<T { row[j] = 0 }
    }

    /// Adds attention gradients into dq, dk, dv (same layouts and strides as q, k, v).
    public static func attentionBackward(
        dq: UnsafeMutablePointer<Float>, dk: UnsafeMutablePointer<Float>, dv: UnsafeMutablePointer<Float>,
        dout: UnsafePointer<Float>, probs: UnsafePointer<Float>,
        q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
        _ s: AttentionShape
    ) {
        let T = s.T, HS = s.HS, group = s.NH / s.NKV
        let dP = UnsafeMutablePointer<Float>.allocate(capacity: T * T)
        defer { dP.deallocate() }
        for b in 0..<s.B {
            for h in 0..<s.NH {
                let g = h / group
                let P = probs + (b * s.NH + h) * T * T
                let doh = dout + b * T * s.outStride + h * HS
                let qh = q + b * T * s.qStride + h * HS
                let kg = k + b * T * s.kStride + g * HS
                let vg = v + b * T * s.vStride + g * HS
                // dV_g += Pᵀ · dO_h
                BLAS.gemm(dv + b * T * s.vStride + g * HS, P, doh, M: T, N: HS, K: T, transA: true, beta: 1,
                          lda: T, ldb: s.outStride, ldc: s.vStride)
                // dP = dO_h · V_gᵀ
                BLAS.gemm(dP, doh, vg, M: T, N: T, K: HS, transB: true, lda: s.outStride, ldb: s.vStride)
                // dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale   (in place in dP)
                let scale = s.scale
                Parallel.forChunks(T, costPerItem: 4 * T) { rows in
                    for t in rows {
                        let p = P + t * T, d = dP + t * T
                        var dot: Float = 0
                        for j in 0...t { dot += p[j] * d[j] }
                        for j in 0...t { d[j] = p[j] * (d[j] - dot) * scale }
                        for j in (t + 1)..<T { d[j] = 0 }
                    }
                }
                // dQ_h += dS · K_g ; dK_g += dSᵀ · Q_h
                BLAS.gemm(dq + b * T * s.qStride + h * HS, dP, kg, M: T, N: HS, K: T, beta: 1,
                          lda: T, ldb: s.kStride, ldc: s.qStride)
                BLAS.gemm(dk + b * T * s.kStride + g * HS, dP, qh, M: T, N: HS, K: T, transA: true, beta: 1,
                          lda: T, ldb: s.qStride, ldc: s.kStride)
            }
        }
    }
}

extension Kernels {
    /// Inference attention against a key/value cache: Tq new queries at absolute positions
    /// `past..<past+Tq` attend keys 0...past+t. q: [Tq, NH·HS] (stride qStride); kCache, vCache:
    /// [≥ past+Tq, NKV·HS], `kvStride` apart (default packed); out: [Tq, NH·HS] packed. One sequence (B = 1).
    public static func attentionCached(
        _ out: UnsafeMutablePointer<Float>, q: UnsafePointer<Float>, qStride: Int,
        kCache: UnsafePointer<Float>, vCache: UnsafePointer<Float>, kvStride: Int? = nil,
        past: Int, Tq: Int, NH: Int, NKV: Int, HS: Int
    ) {
        let Tk = past + Tq, group = NH / NKV, kvStride = kvStride ?? NKV * HS
        let scale = 1 / Float(HS).squareRoot()
        let S = UnsafeMutablePointer<Float>.allocate(capacity: Tq * Tk)
        defer { S.deallocate() }
        if Tq == 1 {
            // One decoding step: dot products in place of two matrix-multiply calls per head, whose fixed
            // cost outweighs a [1, Tk] product (a batched decode makes heads × sequences × layers such calls).
            for h in 0..<NH {
                let g = h / group, qh = q + h * HS, oh = out + h * HS
                for j in 0..<Tk {
                    let kj = kCache + j * kvStride + g * HS
                    var d: Float = 0
                    for i in 0..<HS { d += qh[i] * kj[i] }
                    S[j] = d * scale
                }
                maskedSoftmaxRow(S, visible: Tk, T: Tk, keyMask: nil)
                oh.update(repeating: 0, count: HS)
                for j in 0..<Tk {
                    let p = S[j], vj = vCache + j * kvStride + g * HS
                    for i in 0..<HS { oh[i] += p * vj[i] }
                }
            }
            return
        }
        for h in 0..<NH {
            let g = h / group
            BLAS.gemm(S, q + h * HS, kCache + g * HS, M: Tq, N: Tk, K: HS, transB: true, alpha: scale, lda: qStride, ldb: kvStride)
            for t in 0..<Tq { maskedSoftmaxRow(S + t * Tk, visible: past + t + 1, T: Tk, keyMask: nil) }
            BLAS.gemm(out + h * HS, S, vCache + g * HS, M: Tq, N: HS, K: Tk, ldb: kvStride, ldc: NH * HS)
        }
    }
}
