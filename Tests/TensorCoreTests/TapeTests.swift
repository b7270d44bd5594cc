import XCTest
@testable import TensorCore

/// Gradients of tape operations and of two composites against finite differences.
final class TapeTests: XCTestCase {
    let gc = GradCheck()

    /// FNV-1a 64 against the reference vectors of its authors ("" is the offset basis).
    func testFNV1aReferenceVectors() {
        XCTAssertEqual(FNV1a.hash(""), 0xcbf2_9ce4_8422_2325)
        XCTAssertEqual(FNV1a.hash("a"), 0xaf63_dc4c_8601_ec8c)
        XCTAssertEqual(FNV1a.hash("foobar"), 0x8594_4171_f739_67e8)
        var h = FNV1a()
        h.mix(Array("foobar".utf8))
        XCTAssertEqual(h.value, FNV1a.hash("foobar"))
    }

    /// Rows stacked in order, widths kept.
    func testConcatenatingRows() {
        let a = Tensor(shape: [1, 2], values: [1, 2]), b = Tensor(shape: [2, 2], values: [3, 4, 5, 6])
        let c = Tensor.concatenatingRows([a, b])
        XCTAssertEqual(c.shape, [3, 2])
        XCTAssertEqual(c.array, [1, 2, 3, 4, 5, 6])
    }

    func testMatmulAllTransposes() {
        var rng = RNG(seed: 20)
        for ta in [false, true] {
            for tb in [false, true] {
                let a = randn(ta ? [4, 3] : [3, 4], &rng), b = randn(tb ? [5, 4] : [4, 5], &rng)
                gc.checkTape("matmul ta=\(ta) tb=\(tb)", inputs: [a, b]) { t, v in t.matmul(v[0], v[1], transA: ta, transB: tb) }
            }
        }
    }

    func testBroadcastingAddSubMul() {
        var rng = RNG(seed: 21)
        let a = randn([3, 4], &rng)
        for bShape in [[3, 4], [4], [1]] {
            let b = randn(bShape, &rng)
            gc.checkTape("add \(bShape)", inputs: [a, b]) { t, v in t.add(v[0], v[1]) }
            gc.checkTape("sub \(bShape)", inputs: [a, b]) { t, v in t.sub(v[0], v[1]) }
            gc.checkTape("mul \(bShape)", inputs: [a, b]) { t, v in t.mul(v[0], v[1]) }
        }
    }

    func testShapeOperations() {
        var rng = RNG(seed: 22)
        let a = randn([4, 5], &rng), b = randn([2, 5], &rng), c = randn([4, 2], &rng), s = randn([4], &rng)
        gc.checkTape("transpose", inputs: [a]) { t, v in t.transpose(v[0]) }
        gc.checkTape("reshape", inputs: [a]) { t, v in t.reshape(v[0], [2, 10]) }
        gc.checkTape("rows", inputs: [a]) { t, v in t.rows(v[0], 1..<3) }
        gc.checkTape("columns", inputs: [a]) { t, v in t.columns(v[0], 2..<5) }
        gc.checkTape("concatRows", inputs: [a, b]) { t, v in t.concatRows([v[0], v[1]]) }
        gc.checkTape("concatColumns", inputs: [a, c]) { t, v in t.concatColumns([v[0], v[1]]) }
        gc.checkTape("rowScale", inputs: [a, s]) { t, v in t.rowScale(v[0], v[1]) }
        gc.checkTape("sum", inputs: [a]) { t, v in t.sum(v[0]) }
        gc.checkTape("mean", inputs: [a]) { t, v in t.mean(v[0]) }
        gc.checkTape("sumRows", inputs: [a]) { t, v in t.sumRows(v[0]) }
        gc.checkTape("sumLast", inputs: [a]) { t, v in t.sumLast(v[0]) }
        gc.checkTape("scale", inputs: [a]) { t, v in t.scale(v[0], -1.7) }
    }

    func testElementwiseAndNormOperations() {
        var rng = RNG(seed: 23)
        let x = randn([3, 6], &rng), w = randn([6], &rng), b = randn([6], &rng)
        for i in 0..<x.count where abs(x[i]) < 0.05 || abs(abs(x[i]) - 0.5) < 0.05 { x[i] += 0.2 }
        gc.checkTape("layerNorm", inputs: [x, w, b]) { t, v in t.layerNorm(v[0], v[1], v[2]) }
        gc.checkTape("layerNorm no affine", inputs: [x]) { t, v in t.layerNorm(v[0], nil, nil) }
        gc.checkTape("rmsNorm", inputs: [x, w]) { t, v in t.rmsNorm(v[0], v[1]) }
        gc.checkTape("gelu", inputs: [x]) { t, v in t.gelu(v[0]) }
        gc.checkTape("relu", inputs: [x]) { t, v in t.relu(v[0]) }
        gc.checkTape("silu", inputs: [x]) { t, v in t.silu(v[0]) }
        gc.checkTape("clamp", inputs: [x]) { t, v in t.clamp(v[0], min: -0.5, max: 0.5) }
        gc.checkTape("sigmoid", inputs: [x]) { t, v in t.sigmoid(v[0]) }
        gc.checkTape("exp", inputs: [x]) { t, v in t.exp(v[0]) }
        gc.checkTape("softmax", inputs: [x]) { t, v in t.softmax(v[0]) }
        gc.checkTape("logSoftmax", inputs: [x]) { t, v in t.logSoftmax(v[0]) }
    }

    func testLinearThroughTapeAndVariableUsedTwice() {
        var rng = RNG(seed: 24)
        let x = randn([5, 4], &rng), w = randn([3, 4], &rng), b = randn([3], &rng)
        gc.checkTape("linear", inputs: [x, w, b]) { t, v in t.linear(v[0], v[1], v[2]) }
        // x feeds two paths: gradients must add.
        gc.checkTape("reuse", inputs: [x]) { t, v in t.mul(v[0], t.gelu(v[0])) }
    }

    func testGradientsOnlyWhereRequested() {
        var rng = RNG(seed: 25)
        let x = randn([2, 3], &rng), w = randn([4, 3], &rng)
        gc.checkTape("partial", inputs: [x, w], needsGrad: [false, true]) { t, v in t.linear(v[0], v[1]) }
        let tape = Tape()
        let a = tape.leaf(x), b = tape.leaf(w)
        let y = tape.linear(a, b)
        XCTAssertFalse(y.requiresGrad)
        XCTAssertEqual(tape.count, 0, "nothing to record when no input needs a gradient")
    }

    /// Composite 1: a tiny MLP classifier (linear → GELU → LayerNorm → linear → masked cross-entropy).
    func testTinyMLPComposite() {
        var rng = RNG(seed: 26)
        let N = 6, C = 5, H = 8, V = 4
        let x = randn([N, C], &rng), w1 = randn([H, C], &rng, std: 0.5), b1 = randn([H], &rng)
        let w2 = randn([V, H], &rng, std: 0.5), b2 = randn([V], &rng)
        let labels: [Int32] = [0, 3, 1, 2, 2, 0]
        let mask: [Float] = [1, 1, 0, 1, 1, 1]
        gc.checkTape("mlp", inputs: [x, w1, b1, w2, b2]) { t, v in
            let h = t.layerNorm(t.gelu(t.linear(v[0], v[1], v[2])), nil, nil)
            return t.crossEntropy(t.linear(h, v[3], v[4]), labels: labels, mask: mask, mean: true)
        }
    }

    /// Composite 2: a pre-norm causal attention block with grouped heads and a residual.
    func testTinyAttentionBlockComposite() {
        var rng = RNG(seed: 27)
        let B = 2, T = 3, C = 8, NH = 4, NKV = 2, HS = C / NH
        let x = randn([B * T, C], &rng)
        let lnw = randn([C], &rng), lnb = randn([C], &rng)
        let wq = randn([C, C], &rng, std: 0.4), wk = randn([NKV * HS, C], &rng, std: 0.4), wv = randn([NKV * HS, C], &rng, std: 0.4)
        let wo = randn([C, C], &rng, std: 0.4)
        gc.checkTape("attention block", inputs: [x, lnw, lnb, wq, wk, wv, wo]) { t, v in
            let h = t.layerNorm(v[0], v[1], v[2])
            let a = t.attention(q: t.linear(h, v[3]), k: t.linear(h, v[4]), v: t.linear(h, v[5]), B: B, T: T, NH: NH, NKV: NKV)
            return t.add(v[0], t.linear(a, v[6]))
        }
    }
}

final class OptimizerTests: XCTestCase {
    func testAdamWStepMatchesFormula() {
        let p = Parameter(name: "w", value: Tensor(shape: [2], values: [1, -2]), decay: true)
        p.grad.assign(Tensor(shape: [2], values: [0.5, -1]))
        let opt = AdamW(params: [p], learningRate: 0.1, weightDecay: 0.01)
        opt.update()
        // Step 1: m̂ = g, v̂ = g², update = lr·(g/(|g|+eps) + wd·w).
        XCTAssertEqual(p.value[0], 1 - 0.1 * (1 + 0.01 * 1), accuracy: 1e-6)
        XCTAssertEqual(p.value[1], -2 - 0.1 * (-1 + 0.01 * -2), accuracy: 1e-6)
    }

    func testBiasesAreNotDecayedByDefault() {
        let b = Parameter(name: "b", value: Tensor(shape: [3], repeating: 1))
        let opt = AdamW(params: [b], learningRate: 0.1, weightDecay: 0.5)
        opt.update() // zero gradient: only decay could move it
        XCTAssertEqual(b.value.array, [1, 1, 1])
    }

    func testAdamMinimisesAQuadratic() {
        var rng = RNG(seed: 3)
        let target = randn([10], &rng)
        let p = Parameter(name: "x", value: Tensor(shape: [10]))
        let opt = AdamW(params: [p], learningRate: 0.05)
        for _ in 0..<500 {
            opt.zeroGrad()
            for i in 0..<10 { p.grad[i] = 2 * (p.value[i] - target[i]) }
            opt.update()
        }
        XCTAssertLessThan(p.value.maxAbsDifference(target), 1e-2)
    }

    func testClipGradNorm() {
        let a = Parameter(name: "a", value: Tensor(shape: [2])), b = Parameter(name: "b", value: Tensor(shape: [1]))
        a.grad.assign(Tensor(shape: [2], values: [3, 0]))
        b.grad.assign(Tensor(shape: [1], values: [4]))
        let norm = clipGradNorm([a, b], maxNorm: 1)
        XCTAssertEqual(norm, 5, accuracy: 1e-5)
        XCTAssertEqual(a.grad[0], 0.6, accuracy: 1e-4)
        XCTAssertEqual(b.grad[0], 0.8, accuracy: 1e-4)
        XCTAssertEqual(clipGradNorm([a, b], maxNorm: 10), 1, accuracy: 1e-4, "below the bound nothing changes")
    }

    func testCosineSchedule() {
        let s = CosineSchedule(maxLR: 1, minLR: 0.1, warmupSteps: 10, totalSteps: 110)
        XCTAssertEqual(s.learningRate(step: 0), 0.1, accuracy: 1e-6)
        XCTAssertEqual(s.learningRate(step: 9), 1, accuracy: 1e-6)
        XCTAssertEqual(s.learningRate(step: 60), 0.55, accuracy: 1e-5)
        XCTAssertEqual(s.learningRate(step: 500), 0.1, accuracy: 1e-6)
    }
}

final class RNGAndTensorTests: XCTestCase {
    func testSeededAndDeterministic() {
        var a = RNG(seed: 42), b = RNG(seed: 42), c = RNG(seed: 43)
        let xa = (0..<5).map { _ in a.next() }, xb = (0..<5).map { _ in b.next() }, xc = (0..<5).map { _ in c.next() }
        XCTAssertEqual(xa, xb)
        XCTAssertNotEqual(xa, xc)
    }

    func testNormalAndUniformMoments() {
        var rng = RNG(seed: 1)
        let n = 200_000
        var s = 0.0, ss = 0.0, u = 0.0
        for _ in 0..<n { let x = Double(rng.normal()); s += x; ss += x * x; u += Double(rng.uniform()) }
        XCTAssertEqual(s / Double(n), 0, accuracy: 0.01)
        XCTAssertEqual(ss / Double(n), 1, accuracy: 0.02)
        XCTAssertEqual(u / Double(n), 0.5, accuracy: 0.01)
    }

    func testChoiceAndShuffle() {
        var rng = RNG(seed: 5)
        var counts = [0, 0, 0]
        for _ in 0..<30_000 { counts[rng.choice(weights: [1, 2, 7])] += 1 }
        XCTAssertEqual(Double(counts[2]) / 30_000, 0.7, accuracy: 0.02)
        var items = Array(0..<50)
        rng.shuffle(&items)
        XCTAssertEqual(Set(items), Set(0..<50))
        XCTAssertNotEqual(items, Array(0..<50))
    }

    func testViewsShareStorage() {
        let t = Tensor(shape: [3, 4], values: (0..<12).map(Float.init))
        let r = t.row(1)
        XCTAssertEqual(r.array, [4, 5, 6, 7])
        r[0] = 100
        XCTAssertEqual(t[1, 0], 100)
        XCTAssertEqual(t.reshaped([4, 3])[1, 1], 100)
        let c = t.copy()
        c[0] = -1
        XCTAssertEqual(t[0], 0)
    }

    func testMatmulAgainstNaive() {
        var rng = RNG(seed: 9)
        let a = randn([7, 5], &rng), b = randn([5, 6], &rng)
        let c = a.matmul(b)
        for i in 0..<7 { for j in 0..<6 {
            let ref = (0..<5).reduce(Float(0)) { $0 + a[i, $1] * b[$1, j] }
            XCTAssertEqual(c[i, j], ref, accuracy: 1e-5)
        } }
        XCTAssertLessThan(a.matmul(b.transposed(), transOther: true).maxAbsDifference(c), 1e-5)
        XCTAssertLessThan(a.transposed().matmul(b, transSelf: true).maxAbsDifference(c), 1e-5)
    }
}
