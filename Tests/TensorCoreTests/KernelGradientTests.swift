import XCTest
@testable import TensorCore

/// Every kernel's backward against finite differences (tolerances in GradCheck).
final class KernelGradientTests: XCTestCase {
    let gc = GradCheck()

    func testLinearBothLayoutsWithAndWithoutBias() {
        for layout in [WeightLayout.outIn, .inOut] {
            for withBias in [true, false] {
                var rng = RNG(seed: 1)
                let N = 5, C = 4, OC = 3
                let x = randn([N, C], &rng)
                let w = randn(layout == .outIn ? [OC, C] : [C, OC], &rng)
                let b = randn([OC], &rng)
                gc.check("linear \(layout) bias=\(withBias)", inputs: [x, w, b], forward: { t in
                    let out = Tensor(shape: [N, OC])
                    Kernels.linearForward(out.data, t[0].data, t[1].data, withBias ? t[2].data : nil, N: N, C: C, OC: OC, layout: layout)
                    return out
                }, backward: { t, d in
                    let dx = Tensor(shape: [N, C]), dw = Tensor(shape: t[1].shape), db = Tensor(shape: [OC])
                    Kernels.linearBackward(dinp: dx.data, dweight: dw.data, dbias: withBias ? db.data : nil, dout: d.data,
                                           inp: t[0].data, weight: t[1].data, N: N, C: C, OC: OC, layout: layout)
                    return [dx, dw, withBias ? db : nil]
                })
            }
        }
    }

    /// The row-wise linear equals the BLAS one, and a row's result is the same to the bit whether it is
    /// projected alone or among others (widths with and without a remainder past the 16-wide blocks).
    func testLinearRowwiseMatchesAndIsIndependentOfTheOtherRows() {
        // N covers every tail after the four-row tiles: 1, 2 and 3 rows, alone and after a tile.
        for C in [37, 64] { for N in [1, 2, 3, 5, 6, 7] {
            var rng = RNG(seed: 2)
            let OC = 5
            let x = randn([N, C], &rng), w = randn([OC, C], &rng), b = randn([OC], &rng)
            let blas = Tensor(shape: [N, OC]), rowwise = Tensor(shape: [N, OC])
            Kernels.linearForward(blas.data, x.data, w.data, b.data, N: N, C: C, OC: OC)
            Kernels.linearRowwise(rowwise.data, x.data, w.data, b.data, N: N, C: C, OC: OC)
            XCTAssertLessThan(blas.maxAbsDifference(rowwise), 1e-4 * blas.maxAbs())
            for n in 0..<N {
                let one = Tensor(shape: [1, OC])
                Kernels.linearRowwise(one.data, x.data + n * C, w.data, b.data, N: 1, C: C, OC: OC)
                XCTAssertEqual(one.array, Array(rowwise.array[(n * OC)..<((n + 1) * OC)]), "row \(n) of \(N), C \(C)")
            }
        } }
    }

    func testEmbedding() {
        var rng = RNG(seed: 2)
        let V = 6, C = 3
        let ids: [Int32] = [1, 4, 1, 0, 5]
        let table = randn([V, C], &rng)
        gc.check("embedding", inputs: [table], forward: { t in
            let out = Tensor(shape: [ids.count, C])
            Kernels.embeddingForward(out.data, ids: ids, table: t[0].data, N: ids.count, C: C)
            return out
        }, backward: { _, d in
            let dt = Tensor(shape: [V, C])
            Kernels.embeddingBackward(dtable: dt.data, dout: d.data, ids: ids, N: ids.count, C: C)
            return [dt]
        })
    }

    func testLayerNorm() {
        var rng = RNG(seed: 3)
        let N = 4, C = 6
        let x = randn([N, C], &rng), w = randn([C], &rng), b = randn([C], &rng)
        gc.check("layernorm", inputs: [x, w, b], forward: { t in
            let out = Tensor(shape: [N, C])
            Kernels.layerNormForward(out.data, mean: nil, rstd: nil, t[0].data, weight: t[1].data, bias: t[2].data, N: N, C: C)
            return out
        }, backward: { t, d in
            let mean = Tensor(shape: [N]), rstd = Tensor(shape: [N]), out = Tensor(shape: [N, C])
            Kernels.layerNormForward(out.data, mean: mean.data, rstd: rstd.data, t[0].data, weight: t[1].data, bias: t[2].data, N: N, C: C)
            let dx = Tensor(shape: [N, C]), dw = Tensor(shape: [C]), db = Tensor(shape: [C])
            Kernels.layerNormBackward(dinp: dx.data, dweight: dw.data, dbias: db.data, dout: d.data, inp: t[0].data,
                                      weight: t[1].data, mean: mean.data, rstd: rstd.data, N: N, C: C)
            return [dx, dw, db]
        })
    }

    func testLayerNormLargeParallelPathMatchesSerial() {
        // Large enough to take the multi-core path; compare with the same rows computed one by one.
        var rng = RNG(seed: 33)
        let N = 256, C = 192
        let x = randn([N, C], &rng), w = randn([C], &rng), g = randn([N, C], &rng)
        let out = Tensor(shape: [N, C]), mean = Tensor(shape: [N]), rstd = Tensor(shape: [N])
        Kernels.layerNormForward(out.data, mean: mean.data, rstd: rstd.data, x.data, weight: w.data, bias: nil, N: N, C: C)
        let dx = Tensor(shape: [N, C]), dw = Tensor(shape: [C])
        Kernels.layerNormBackward(dinp: dx.data, dweight: dw.data, dbias: nil, dout: g.data, inp: x.data, weight: w.data,
                                  mean: mean.data, rstd: rstd.data, N: N, C: C)
        let dw1 = Tensor(shape: [C])
        for n in 0..<N {
            let dxr = Tensor(shape: [C])
            Kernels.layerNormBackward(dinp: dxr.data, dweight: dw1.data, dbias: nil, dout: g.data + n * C, inp: x.data + n * C,
                                      weight: w.data, mean: mean.data + n, rstd: rstd.data + n, N: 1, C: C)
            XCTAssertLessThan(dxr.maxAbsDifference(dx.row(n)), 1e-5)
        }
        XCTAssertLessThan(dw1.maxAbsDifference(dw), 1e-3)
    }

    /// The norms' per-row sums run eight rows side by side (`Kernels.rowSums`); each row must still be summed in
    /// a plain loop's order, to the bit: a replay of stored versions compares states bit for bit, so any other
    /// order would make versions written before it unreadable.
    func testNormsEqualPlainLoopsBitForBit() {
        var rng = RNG(seed: 35)
        func same(_ a: Tensor, _ b: Tensor, _ what: String) {
            XCTAssertEqual(memcmp(a.data, b.data, a.count * 4), 0, what)
        }
        for (N, C) in [(1, 6), (7, 256), (8, 256), (9, 1280), (19, 64), (33, 1280)] {
            let x = randn([N, C], &rng), w = randn([C], &rng), b = randn([C], &rng), g = randn([N, C], &rng)
            for affine in [true, false] {
                let wp = affine ? UnsafePointer(w.data) : nil, bp = affine ? UnsafePointer(b.data) : nil
                // Layer norm, as one row after another in plain loops.
                let out0 = Tensor(shape: [N, C]), mean0 = Tensor(shape: [N]), rstd0 = Tensor(shape: [N])
                let dx0 = randn([N, C], &rng), dw0 = Tensor(shape: [C]), db0 = Tensor(shape: [C])
                let dx = dx0.copy(), dw = Tensor(shape: [C]), db = Tensor(shape: [C])
                for n in 0..<N {
                    let xr = x.data + n * C, o = out0.data + n * C
                    var m: Float = 0
                    for c in 0..<C { m += xr[c] }
                    m /= Float(C)
                    var v: Float = 0
                    for c in 0..<C { let d = xr[c] - m; v += d * d }
                    v /= Float(C)
                    let s = 1 / (v + 1e-5).squareRoot()
                    for c in 0..<C {
                        var y = (xr[c] - m) * s
                        if let wp { y *= wp[c] }
                        if let bp { y += bp[c] }
                        o[c] = y
                    }
                    mean0[n] = m; rstd0[n] = s
                }
                for n in 0..<N {
                    let xr = x.data + n * C, gr = g.data + n * C, d = dx0.data + n * C, m = mean0[n], s = rstd0[n]
                    var a: Float = 0, bb: Float = 0
                    for c in 0..<C {
                        let norm = (xr[c] - m) * s, dnorm = gr[c] * (wp?[c] ?? 1)
                        a += dnorm; bb += dnorm * norm
                        db0[c] += gr[c]; dw0[c] += norm * gr[c]
                    }
                    a /= Float(C); bb /= Float(C)
                    for c in 0..<C {
                        let norm = (xr[c] - m) * s, dnorm = gr[c] * (wp?[c] ?? 1)
                        d[c] += (dnorm - a - norm * bb) * s
                    }
                }
                let out = Tensor(shape: [N, C]), mean = Tensor(shape: [N]), rstd = Tensor(shape: [N])
                Kernels.layerNormForward(out.data, mean: mean.data, rstd: rstd.data, x.data, weight: wp, bias: bp, N: N, C: C)
                // One chunk, so that dweight and dbias take the rows in the reference's order.
                Kernels.layerNormBackward(dinp: dx.data, dweight: dw.data, dbias: db.data, dout: g.data, inp: x.data, weight: wp,
                                          mean: mean.data, rstd: rstd.data, N: N, C: C)
                let tag = "N \(N) C \(C) affine \(affine)"
                same(out, out0, "layer norm " + tag); same(mean, mean0, "mean " + tag); same(rstd, rstd0, "rstd " + tag)
                same(dx, dx0, "layer norm backward " + tag)
                if N * C * 6 < Parallel.minimumWork { same(dw, dw0, "dweight " + tag); same(db, db0, "dbias " + tag) }
            }
            // RMS norm.
            let out0 = Tensor(shape: [N, C]), rr0 = Tensor(shape: [N]), dx0 = randn([N, C], &rng)
            let dx = dx0.copy()
            for n in 0..<N {
                let xr = x.data + n * C, o = out0.data + n * C
                var ss: Float = 0
                for c in 0..<C { ss += xr[c] * xr[c] }
                let r = 1 / (ss / Float(C) + 1e-6).squareRoot()
                for c in 0..<C { o[c] = w[c] * (xr[c] * r) }
                rr0[n] = r
                let gr = g.data + n * C, d = dx0.data + n * C
                var dot: Float = 0
                for c in 0..<C { dot += gr[c] * w[c] * xr[c] }
                let k = dot * r * r * r / Float(C)
                for c in 0..<C { d[c] += gr[c] * w[c] * r - xr[c] * k }
            }
            let out = Tensor(shape: [N, C]), rr = Tensor(shape: [N])
            Kernels.rmsNormForward(out.data, rrms: rr.data, x.data, weight: w.data, N: N, C: C)
            Kernels.rmsNormBackward(dinp: dx.data, dweight: nil, dout: g.data, inp: x.data, weight: w.data, rrms: rr.data, N: N, C: C)
            same(out, out0, "rms norm N \(N) C \(C)"); same(rr, rr0, "rrms N \(N) C \(C)"); same(dx, dx0, "rms norm backward N \(N) C \(C)")
        }
    }

    func testRMSNorm() {
        var rng = RNG(seed: 4)
        let N = 4, C = 6
        let x = randn([N, C], &rng), w = randn([C], &rng)
        gc.check("rmsnorm", inputs: [x, w], forward: { t in
            let out = Tensor(shape: [N, C])
            Kernels.rmsNormForward(out.data, rrms: nil, t[0].data, weight: t[1].data, N: N, C: C)
            return out
        }, backward: { t, d in
            let rr = Tensor(shape: [N]), out = Tensor(shape: [N, C])
            Kernels.rmsNormForward(out.data, rrms: rr.data, t[0].data, weight: t[1].data, N: N, C: C)
            let dx = Tensor(shape: [N, C]), dw = Tensor(shape: [C])
            Kernels.rmsNormBackward(dinp: dx.data, dweight: dw.data, dout: d.data, inp: t[0].data, weight: t[1].data,
                                    rrms: rr.data, N: N, C: C)
            return [dx, dw]
        })
    }

    typealias Fwd = (UnsafeMutablePointer<Float>, UnsafePointer<Float>, Int) -> Void
    typealias Bwd = (UnsafeMutablePointer<Float>, UnsafePointer<Float>, UnsafePointer<Float>, Int) -> Void

    func checkUnary(_ name: String, _ x: Tensor, _ f: Fwd, _ b: Bwd) {
        gc.check(name, inputs: [x], forward: { t in
            let out = Tensor(shape: t[0].shape); f(out.data, t[0].data, out.count); return out
        }, backward: { t, d in
            let dx = Tensor(shape: t[0].shape); b(dx.data, d.data, t[0].data, dx.count); return [dx]
        })
    }

    func testActivations() {
        var rng = RNG(seed: 5)
        // Keep inputs away from the kinks of ReLU and clamp, where finite differences are undefined.
        let x = randn([3, 7], &rng, std: 2)
        for i in 0..<x.count where abs(x[i]) < 0.05 || abs(abs(x[i]) - 1) < 0.05 { x[i] += 0.2 }
        checkUnary("gelu", x, { Kernels.geluForward($0, $1, count: $2) }, { Kernels.geluBackward(dinp: $0, dout: $1, inp: $2, count: $3) })
        checkUnary("silu", x, { Kernels.siluForward($0, $1, count: $2) }, { Kernels.siluBackward(dinp: $0, dout: $1, inp: $2, count: $3) })
        checkUnary("relu", x, { Kernels.reluForward($0, $1, count: $2) }, { Kernels.reluBackward(dinp: $0, dout: $1, inp: $2, count: $3) })
        checkUnary("clamp", x, { Kernels.clampForward($0, $1, lo: -1, hi: 1, count: $2) },
                   { Kernels.clampBackward(dinp: $0, dout: $1, inp: $2, lo: -1, hi: 1, count: $3) })
    }

    func testGELUMatchesTanhFormula() {
        let x: [Float] = [-3, -1, -0.5, 0, 0.5, 1, 3]
        let out = Tensor(shape: [x.count])
        Kernels.geluForward(out.data, x, count: x.count)
        for (i, v) in x.enumerated() {
            let d = Double(v)
            let ref = 0.5 * d * (1 + tanh((2 / Double.pi).squareRoot() * (d + 0.044715 * d * d * d)))
            XCTAssertEqual(Double(out[i]), ref, accuracy: 1e-6)
        }
    }

    func testSwiGLU() {
        var rng = RNG(seed: 6)
        let g = randn([2, 5], &rng), u = randn([2, 5], &rng)
        gc.check("swiglu", inputs: [g, u], forward: { t in
            let out = Tensor(shape: [2, 5]); Kernels.swigluForward(out.data, gate: t[0].data, up: t[1].data, count: 10); return out
        }, backward: { t, d in
            let dg = Tensor(shape: [2, 5]), du = Tensor(shape: [2, 5])
            Kernels.swigluBackward(dgate: dg.data, dup: du.data, dout: d.data, gate: t[0].data, up: t[1].data, count: 10)
            return [dg, du]
        })
    }

    func testSoftmaxAndLogSoftmax() {
        var rng = RNG(seed: 7)
        let x = randn([3, 6], &rng)
        gc.check("softmax", inputs: [x], forward: { t in
            let out = Tensor(shape: [3, 6]); Kernels.softmaxForward(out.data, t[0].data, N: 3, C: 6); return out
        }, backward: { t, d in
            let out = Tensor(shape: [3, 6]); Kernels.softmaxForward(out.data, t[0].data, N: 3, C: 6)
            let dx = Tensor(shape: [3, 6]); Kernels.softmaxBackward(dinp: dx.data, dout: d.data, out: out.data, N: 3, C: 6)
            return [dx]
        })
        gc.check("logsoftmax", inputs: [x], forward: { t in
            let out = Tensor(shape: [3, 6]); Kernels.logSoftmaxForward(out.data, t[0].data, N: 3, C: 6); return out
        }, backward: { t, d in
            let out = Tensor(shape: [3, 6]); Kernels.logSoftmaxForward(out.data, t[0].data, N: 3, C: 6)
            let dx = Tensor(shape: [3, 6]); Kernels.logSoftmaxBackward(dinp: dx.data, dout: d.data, out: out.data, N: 3, C: 6)
            return [dx]
        })
    }

    func testCrossEntropyWithMask() {
        var rng = RNG(seed: 8)
        let N = 4, V = 7
        let logits = randn([N, V], &rng)
        let labels: [Int32] = [2, 0, 6, 3]
        let mask: [Float] = [1, 0, 1, 1]
        for scale: Float in [1, 1.0 / 3] { // sum and mean (Σ mask = 3)
            gc.check("cross-entropy scale \(scale)", inputs: [logits], forward: { t in
                let (s, _) = Kernels.crossEntropy(losses: nil, dlogits: nil, logits: t[0].data, labels: labels, mask: mask, N: N, V: V)
                return Tensor(shape: [1], values: [s * scale])
            }, backward: { t, d in
                let dl = Tensor(shape: [N, V])
                Kernels.crossEntropy(losses: nil, dlogits: dl.data, logits: t[0].data, labels: labels, mask: mask, N: N, V: V, gradScale: d[0] * scale)
                return [dl]
            })
        }
        // The value itself: −log softmax at the label, masked rows excluded.
        let (s, m) = Kernels.crossEntropy(losses: nil, dlogits: nil, logits: logits.data, labels: labels, mask: mask, N: N, V: V)
        var ref: Double = 0
        for n in 0..<N where mask[n] != 0 {
            let row = (0..<V).map { Double(logits[n, $0]) }
            let lse = log(row.map { exp($0) }.reduce(0, +))
            ref += lse - row[Int(labels[n])]
        }
        XCTAssertEqual(Double(s), ref, accuracy: 1e-5)
        XCTAssertEqual(m, 3)
    }

    func testKLDivergenceWithMask() {
        var rng = RNG(seed: 9)
        let N = 3, V = 5
        let logits = randn([N, V], &rng), ref = randn([N, V], &rng)
        let mask: [Float] = [1, 1, 0]
        gc.check("kl", inputs: [logits], forward: { t in
            let (s, _) = Kernels.klDivergence(rows: nil, dlogits: nil, logits: t[0].data, refLogits: ref.data, mask: mask, N: N, V: V)
            return Tensor(shape: [1], values: [s])
        }, backward: { t, d in
            let dl = Tensor(shape: [N, V])
            Kernels.klDivergence(rows: nil, dlogits: dl.data, logits: t[0].data, refLogits: ref.data, mask: mask, N: N, V: V, gradScale: d[0])
            return [dl]
        })
        let (zero, _) = Kernels.klDivergence(rows: nil, dlogits: nil, logits: ref.data, refLogits: ref.data, mask: nil, N: N, V: V)
        XCTAssertEqual(zero, 0, accuracy: 1e-6)
    }

    func testCausalAttentionGroupedHeadsWithPadding() {
        var rng = RNG(seed: 10)
        let B = 2, T = 4, NH = 4, NKV = 2, HS = 3
        let q = randn([B * T, NH * HS], &rng), k = randn([B * T, NKV * HS], &rng), v = randn([B * T, NKV * HS], &rng)
        // Batch 1 is left-padded by one position.
        let keyMask = Tensor(shape: [B, T], values: [1, 1, 1, 1, 0, 1, 1, 1])
        let s = AttentionShape(B: B, T: T, NH: NH, NKV: NKV, HS: HS)
        gc.check("attention", inputs: [q, k, v], forward: { t in
            let out = Tensor(shape: [B * T, NH * HS]), probs = Tensor(shape: [B, NH, T, T])
            Kernels.attentionForward(out.data, probs: probs.data, q: t[0].data, k: t[1].data, v: t[2].data, keyMask: keyMask.data, s)
            return out
        }, backward: { t, d in
            let out = Tensor(shape: [B * T, NH * HS]), probs = Tensor(shape: [B, NH, T, T])
            Kernels.attentionForward(out.data, probs: probs.data, q: t[0].data, k: t[1].data, v: t[2].data, keyMask: keyMask.data, s)
            let dq = Tensor(shape: q.shape), dk = Tensor(shape: k.shape), dv = Tensor(shape: v.shape)
            Kernels.attentionBackward(dq: dq.data, dk: dk.data, dv: dv.data, dout: d.data, probs: probs.data,
                                      q: t[0].data, k: t[1].data, v: t[2].data, s)
            return [dq, dk, dv]
        })
    }

    func testAttentionIsCausalAndMatchesNaive() {
        var rng = RNG(seed: 11)
        let T = 5, NH = 2, HS = 4
        let q = randn([T, NH * HS], &rng), k = randn([T, NH * HS], &rng), v = randn([T, NH * HS], &rng)
        let s = AttentionShape(B: 1, T: T, NH: NH, HS: HS)
        let out = Tensor(shape: [T, NH * HS]), probs = Tensor(shape: [1, NH, T, T])
        Kernels.attentionForward(out.data, probs: probs.data, q: q.data, k: k.data, v: v.data, keyMask: nil, s)
        for h in 0..<NH {
            for t in 0..<T {
                var w = (0...t).map { j in (0..<HS).reduce(0.0) { $0 + Double(q[t, h * HS + $1] * k[j, h * HS + $1]) } / Double(HS).squareRoot() }
                let m = w.max()!
                w = w.map { exp($0 - m) }
                let z = w.reduce(0, +)
                for c in 0..<HS {
                    let ref = (0...t).reduce(0.0) { $0 + w[$1] / z * Double(v[$1, h * HS + c]) }
                    XCTAssertEqual(Double(out[t, h * HS + c]), ref, accuracy: 1e-5)
                }
            }
        }
    }

    /// Attention against a cache (grouped heads, keys a wider stride apart) equals the full causal
    /// attention's rows: one query at a time (the decoding step) and several at once.
    func testCachedAttentionMatchesFullAttention() {
        var rng = RNG(seed: 13)
        let T = 7, NH = 4, NKV = 2, HS = 5, stride = NKV * HS + 3
        let q = randn([T, NH * HS], &rng), k = randn([T, NKV * HS], &rng), v = randn([T, NKV * HS], &rng)
        let full = Tensor(shape: [T, NH * HS]), probs = Tensor(shape: [1, NH, T, T])
        Kernels.attentionForward(full.data, probs: probs.data, q: q.data, k: k.data, v: v.data, keyMask: nil,
                                 AttentionShape(B: 1, T: T, NH: NH, NKV: NKV, HS: HS))
        let kc = Tensor(shape: [T, stride]), vc = Tensor(shape: [T, stride])
        for t in 0..<T {
            (kc.data + t * stride).update(from: k.data + t * NKV * HS, count: NKV * HS)
            (vc.data + t * stride).update(from: v.data + t * NKV * HS, count: NKV * HS)
        }
        for (past, Tq) in [(0, T), (T - 1, 1), (2, 1), (3, 4)] {
            let out = Tensor(shape: [Tq, NH * HS])
            Kernels.attentionCached(out.data, q: q.data + past * NH * HS, qStride: NH * HS, kCache: kc.data, vCache: vc.data,
                                    kvStride: stride, past: past, Tq: Tq, NH: NH, NKV: NKV, HS: HS)
            XCTAssertLessThan(out.maxAbsDifference(full.rows(past..<(past + Tq))), 1e-5, "past \(past), \(Tq) queries")
        }
    }

    func testRotaryForwardAndInverse() {
        var rng = RNG(seed: 12)
        let N = 3, heads = 2, HS = 4
        let table = RotaryTable(headDim: HS, maxPositions: 16)
        let positions: [Int32] = [0, 3, 7]
        let x = randn([N, heads * HS], &rng)
        gc.check("rotary", inputs: [x], forward: { t in
            let y = t[0].copy()
            Kernels.rotary(y.data, positions: positions, table: table, N: N, heads: heads, stride: heads * HS)
            return y
        }, backward: { _, d in
            let g = d.copy()
            Kernels.rotary(g.data, positions: positions, table: table, N: N, heads: heads, stride: heads * HS, inverse: true)
            return [g]
        })
        // Position 0 is the identity; the rotation keeps norms.
        let y = x.copy()
        Kernels.rotary(y.data, positions: positions, table: table, N: N, heads: heads, stride: heads * HS)
        XCTAssertLessThan(y.row(0).maxAbsDifference(x.row(0)), 1e-7)
        XCTAssertEqual(y.norm, x.norm, accuracy: 1e-4)
    }
}
