import Foundation
import TensorCore

/// Throughput of the language model: forward, and forward+backward (training), in tokens/s and
/// GFLOP/s, with the share of the machine's measured matrix-multiply peak.
public enum LMBenchmark {
    public struct Result: Codable, Sendable {
        public var model: String
        public var parameters: Int
        public var batch: Int
        public var seq: Int
        public var forwardTokensPerS: Double
        public var trainTokensPerS: Double
        /// Training (forward+backward) GFLOP/s.
        public var gflops: Double
        public var forwardGflops: Double
        /// Measured sgemm peak (best of n = 1024, 2048) in the same run.
        public var peakGflops: Double
        public var peakShare: Double

        enum CodingKeys: String, CodingKey {
            case model, parameters, batch, seq, gflops
            case forwardTokensPerS = "forward_tokens_per_s", trainTokensPerS = "train_tokens_per_s"
            case forwardGflops = "forward_gflops", peakGflops = "peak_gflops", peakShare = "peak_share"
        }
    }

    /// Preset architectures with random weights.
    public static func preset(_ name: String) -> TransformerSpec? {
        switch name {
        case "gpt2-small":
            return GPT2Configuration(vocabSize: 50257, nPositions: 1024, nEmbd: 768, nLayer: 12, nHead: 12).spec()
        case "small":
            return GPT2Configuration(vocabSize: 4096, nPositions: 256, nEmbd: 256, nLayer: 4, nHead: 4).spec()
        default:
            return nil
        }
    }

    /// Matrix-multiply FLOPs of one forward over B·T tokens: 2 per weight per token for every linear
    /// layer and the head, plus QKᵀ and PV over the full T×T score matrix.
    public static func forwardFlops(_ s: TransformerSpec, B: Int, T: Int) -> Double {
        let N = Double(B * T)
        var perToken = 0.0
        let qkv = Double(s.hidden * (s.qDim + 2 * s.kvDim)), out = Double(s.qDim * s.hidden)
        let mlp = Double(s.hidden * s.intermediate) * Double(s.mlp == .swiglu ? 3 : 2)
        perToken += Double(s.layers) * (qkv + out + mlp) + Double(s.hidden * s.vocabSize)
        let attention = Double(s.layers) * 2 * 2 * Double(T) * Double(s.qDim)
        return 2 * N * perToken + N * attention
    }

    public static func run(model: TransformerLM, name: String, B: Int, T: Int, seconds: Double = 3) -> Result {
        var rng = RNG(seed: 3)
        let V = model.spec.vocabSize
        let ids = (0..<(B * T)).map { _ in Int32(rng.index(V)) }
        let batch = TokenBatch(ids: ids, B: B, T: T)
        let labels = (0..<(B * T)).map { _ in Int32(rng.index(V)) }
        let dlogits = Tensor(shape: [B * T, V])
        func timed(_ body: () -> Void) -> Double { KernelBenchmark.time(repeats: 3, minSeconds: seconds, body) }
        let tf = timed { model.forward(batch) }
        let tt = timed {
            let logits = model.forward(batch)
            dlogits.zero()
            Kernels.crossEntropy(losses: nil, dlogits: dlogits.data, logits: logits.data, labels: labels, mask: nil,
                                 N: B * T, V: V, gradScale: 1 / Float(B * T))
            model.backward(dlogits: dlogits)
        }
        let peak = KernelBenchmark.matmul(sizes: [1024, 2048]).map(\.blasGflops).max() ?? 1
        let f = forwardFlops(model.spec, B: B, T: T)
        let gflops = 3 * f / tt / 1e9
        return Result(model: name, parameters: model.parameterCount, batch: B, seq: T,
                      forwardTokensPerS: Double(B * T) / tf, trainTokensPerS: Double(B * T) / tt,
                      gflops: gflops, forwardGflops: f / tf / 1e9, peakGflops: peak, peakShare: gflops / peak)
    }
}
