import TensorCore

/// The architecture-neutral description of a decoder-only transformer. GPT2.swift and Llama.swift
/// translate their Hugging Face configurations into this, with the HF tensor names.
public struct TransformerSpec: Sendable {
    public enum Norm: Sendable, Equatable { case layer(eps: Float), rms(eps: Float) }
    public enum Positions: Sendable, Equatable { case learned, rotary(theta: Float) }
    public enum MLP: Sendable, Equatable { case gelu, swiglu }

    public var modelType: String
    public var vocabSize: Int
    public var hidden: Int
    public var layers: Int
    public var heads: Int
    public var kvHeads: Int
    public var headDim: Int
    public var intermediate: Int
    public var maxPositions: Int
    public var norm: Norm
    public var positions: Positions
    public var mlp: MLP
    public var tiedHead: Bool
    /// Whether linear layers carry biases (GPT-2: all; Llama: `attention_bias`/`mlp_bias`).
    public var attentionBias: Bool
    public var mlpBias: Bool
    /// Weight storage of linear layers: GPT-2's Conv1D is [in, out]; torch Linear is [out, in].
    public var layout: WeightLayout
    /// HF names.
    public var names: Names

    public struct Names: Sendable {
        public var tokenEmbedding: String
        public var positionEmbedding: String?
        public var finalNorm: String
        public var head: String?
        /// Per layer prefix, e.g. "transformer.h.3".
        public var layerPrefix: @Sendable (Int) -> String
        public var norm1: String, norm2: String
        /// One fused projection ["attn.c_attn"] or three ["self_attn.q_proj", "k_proj", "v_proj"].
        public var qkv: [String]
        public var attnOut: String
        /// ["mlp.c_fc"] (GELU) or ["mlp.gate_proj", "mlp.up_proj"] (SwiGLU).
        public var mlpIn: [String]
        public var mlpOut: String

    }

    public var qDim: Int { heads * headDim }
    public var kvDim: Int { kvHeads * headDim }

    /// Every parameter with its HF name and shape, in a fixed order.
    public func parameterShapes() -> [(name: String, shape: [Int])] {
        var out: [(String, [Int])] = []
        func w(_ inF: Int, _ outF: Int) -> [Int] { layout == .inOut ? [inF, outF] : [outF, inF] }
        out.append((names.tokenEmbedding + ".weight", [vocabSize, hidden]))
        if positions == .learned, let p = names.positionEmbedding { out.append((p + ".weight", [maxPositions, hidden])) }
        let hasNormBias: Bool = { if case .layer = norm { return true } else { return false } }()
        for l in 0..<layers {
            let p = names.layerPrefix(l) + "."
            out.append((p + names.norm1 + ".weight", [hidden]))
            if hasNormBias { out.append((p + names.norm1 + ".bias", [hidden])) }
            let qkvOuts = names.qkv.count == 1 ? [qDim + 2 * kvDim] : [qDim, kvDim, kvDim]
            for (n, o) in zip(names.qkv, qkvOuts) {
                out.append((p + n + ".weight", w(hidden, o)))
                if attentionBias { out.append((p + n + ".bias", [o])) }
            }
            out.append((p + names.attnOut + ".weight", w(qDim, hidden)))
            if attentionBias { out.append((p + names.attnOut + ".bias", [hidden])) }
            out.append((p + names.norm2 + ".weight", [hidden]))
            if hasNormBias { out.append((p + names.norm2 + ".bias", [hidden])) }
            for n in names.mlpIn {
                out.append((p + n + ".weight", w(hidden, intermediate)))
                if mlpBias { out.append((p + n + ".bias", [intermediate])) }
            }
            out.append((p + names.mlpOut + ".weight", w(intermediate, hidden)))
            if mlpBias { out.append((p + names.mlpOut + ".bias", [hidden])) }
        }
        out.append((names.finalNorm + ".weight", [hidden]))
        if hasNormBias { out.append((names.finalNorm + ".bias", [hidden])) }
        if !tiedHead, let h = names.head { out.append((h + ".weight", [vocabSize, hidden])) }
        return out
    }

    /// Names of the linear modules (without ".weight") a layer holds, in forward order.
    public func linearModules(layer l: Int) -> [String] {
        let p = names.layerPrefix(l) + "."
        return (names.qkv + [names.attnOut] + names.mlpIn + [names.mlpOut]).map { p + $0 }
    }
}
