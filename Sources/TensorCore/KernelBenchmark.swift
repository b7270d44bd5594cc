import COpenBLAS
import Foundation

/// Timings of the numerical core: matrix multiply throughput and forward+backward times of the
/// heavier kernels at the sizes a small GPT-2 uses.
public enum KernelBenchmark {
    public struct MatmulResult: Codable, Sendable {
        public var n: Int
        /// Through `Tensor.matmul` (our wrapper, output allocation included).
        public var gflops: Double
        /// Calling `cblas_sgemm` directly into a preallocated output: OpenBLAS's own rate.
        public var blasGflops: Double
        public var overhead: Double { blasGflops > 0 ? 1 - gflops / blasGflops : 0 }
    }

    public struct KernelResult: Codable, Sendable {
        public var name: String
        public var shape: String
        public var forwardMs: Double
        public var backwardMs: Double
    }

    public struct Report: Codable, Sendable {
        public var threads: Int
        public var matmul: [MatmulResult]
        public var kernels: [KernelResult]
    }

    /// Seconds per call, the best of `repeats` timed rounds after a warm-up call.
    public static func time(repeats: Int = 5, minSeconds: Double = 0.2, _ body: () -> Void) -> Double {
        body()
        var best = Double.infinity
        for _ in 0..<repeats {
            var calls = 0
            let start = DispatchTime.now().uptimeNanoseconds
            var elapsed = 0.0
            repeat {
                body()
                calls += 1
                elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            } while elapsed < minSeconds / Double(repeats)
            best = min(best, elapsed / Double(calls))
        }
        return best
    }

    public static func matmul(sizes: [Int] = [256, 512, 1024, 2048]) -> [MatmulResult] {
        var rng = RNG(seed: 1)
        return sizes.map { n in
            let a = Tensor.randn([n, n], rng: &rng), b = Tensor.randn([n, n], rng: &rng)
            let c = Tensor(shape: [n, n])
            let flops = 2.0 * Double(n) * Double(n) * Double(n)
            let tRaw = time {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(n), Int32(n), 1, a.data, Int32(n),
                            b.data, Int32(n), 0, c.data, Int32(n))
            }
            let tOurs = time { _ = a.matmul(b) }
            return MatmulResult(n: n, gflops: flops / tOurs / 1e9, blasGflops: flops / tRaw / 1e9)
        }
    }

    public static func kernels() -> [KernelResult] {
        var rng = RNG(seed: 2)
        var results: [KernelResult] = []
        // LayerNorm on GPT-2-small activations: B·T = 512 rows of 768.
        do {
            let N = 512, C = 768
            let x = Tensor.randn([N, C], rng: &rng), w = Tensor(shape: [C], repeating: 1), b = Tensor(shape: [C])
            let out = Tensor(shape: [N, C]), mean = Tensor(shape: [N]), rstd = Tensor(shape: [N])
            let dx = Tensor(shape: [N, C]), dw = Tensor(shape: [C]), db = Tensor(shape: [C]), g = Tensor.randn([N, C], rng: &rng)
            let f = time { Kernels.layerNormForward(out.data, mean: mean.data, rstd: rstd.data, x.data, weight: w.data, bias: b.data, N: N, C: C) }
            let bw = time {
                Kernels.layerNormBackward(dinp: dx.data, dweight: dw.data, dbias: db.data, dout: g.data, inp: x.data, weight: w.data,
                                          mean: mean.data, rstd: rstd.data, N: N, C: C)
            }
            results.append(KernelResult(name: "layernorm", shape: "N=\(N) C=\(C)", forwardMs: f * 1e3, backwardMs: bw * 1e3))
        }
        // Causal attention, GPT-2-small head layout: B=4, T=128, 12 heads of 64.
        do {
            let B = 4, T = 128, NH = 12, HS = 64
            let s = AttentionShape(B: B, T: T, NH: NH, HS: HS)
            let q = Tensor.randn([B * T, NH * HS], rng: &rng), k = Tensor.randn([B * T, NH * HS], rng: &rng)
            let v = Tensor.randn([B * T, NH * HS], rng: &rng), g = Tensor.randn([B * T, NH * HS], rng: &rng)
            let out = Tensor(shape: [B * T, NH * HS]), probs = Tensor(shape: [B, NH, T, T])
            let dq = Tensor(shape: q.shape), dk = Tensor(shape: k.shape), dv = Tensor(shape: v.shape)
            let f = time { Kernels.attentionForward(out.data, probs: probs.data, q: q.data, k: k.data, v: v.data, keyMask: nil, s) }
            let bw = time {
                Kernels.attentionBackward(dq: dq.data, dk: dk.data, dv: dv.data, dout: g.data, probs: probs.data, q: q.data, k: k.data, v: v.data, s)
            }
            results.append(KernelResult(name: "attention", shape: "B=\(B) T=\(T) NH=\(NH) HS=\(HS)", forwardMs: f * 1e3, backwardMs: bw * 1e3))
        }
        // GELU on the MLP hidden layer: 512 × 3072.
        do {
            let n = 512 * 3072
            let x = Tensor.randn([n], rng: &rng), out = Tensor(shape: [n]), dx = Tensor(shape: [n]), g = Tensor.randn([n], rng: &rng)
            let f = time { Kernels.geluForward(out.data, x.data, count: n) }
            let bw = time { Kernels.geluBackward(dinp: dx.data, dout: g.data, inp: x.data, count: n) }
            results.append(KernelResult(name: "gelu", shape: "n=\(n)", forwardMs: f * 1e3, backwardMs: bw * 1e3))
        }
        // Cross-entropy over a vocabulary of 8192 for 512 positions (fused softmax + gradient).
        do {
            let N = 512, V = 8192
            let logits = Tensor.randn([N, V], rng: &rng), d = Tensor(shape: [N, V])
            let labels = (0..<N).map { Int32($0 % V) }
            let f = time { Kernels.crossEntropy(losses: nil, dlogits: nil, logits: logits.data, labels: labels, mask: nil, N: N, V: V) }
            let fb = time { Kernels.crossEntropy(losses: nil, dlogits: d.data, logits: logits.data, labels: labels, mask: nil, N: N, V: V) }
            results.append(KernelResult(name: "cross-entropy", shape: "N=\(N) V=\(V)", forwardMs: f * 1e3, backwardMs: max(fb - f, 0) * 1e3))
        }
        return results
    }

    public static func run(sizes: [Int] = [256, 512, 1024, 2048]) -> Report {
        Report(threads: BLAS.threads, matmul: matmul(sizes: sizes), kernels: kernels())
    }
}
