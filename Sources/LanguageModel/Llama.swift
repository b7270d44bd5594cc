import Foundation
import TensorCore

/// `config.json` of a Llama model (HF key names).
public struct LlamaConfiguration: Codable, Sendable {
    public var vocabSize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var numKeyValueHeads: Int
    public var headDim: Int
    public var maxPositionEmbeddings: Int
    public var rmsNormEps: Float
    public var ropeTheta: Float
    public var tieWordEmbeddings: Bool
    public var attentionBias: Bool
    public var mlpBias: Bool
    public var hiddenAct: String
    public var ropeType: String
    public var bosTokenId: Int?
    public var eosTokenId: Int?

    enum CodingKeys: String, CodingKey {
        case vocabSize = "vocab_size", hiddenSize = "hidden_size", intermediateSize = "intermediate_size"
        case numHiddenLayers = "num_hidden_layers", numAttentionHeads = "num_attention_heads"
        case numKeyValueHeads = "num_key_value_heads", headDim = "head_dim", maxPositionEmbeddings = "max_position_embeddings"
        case rmsNormEps = "rms_norm_eps", ropeTheta = "rope_theta", tieWordEmbeddings = "tie_word_embeddings"
        case attentionBias = "attention_bias", mlpBias = "mlp_bias", hiddenAct = "hidden_act"
        case ropeParameters = "rope_parameters", ropeScaling = "rope_scaling"
        case bosTokenId = "bos_token_id", eosTokenId = "eos_token_id"
    }

    struct RopeParameters: Codable {
        var ropeTheta: Float?
        var ropeType: String?
        var type: String?
        enum CodingKeys: String, CodingKey { case ropeTheta = "rope_theta", ropeType = "rope_type", type }
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vocabSize = try c.decode(Int.self, forKey: .vocabSize)
        hiddenSize = try c.decode(Int.self, forKey: .hiddenSize)
        intermediateSize = try c.decode(Int.self, forKey: .intermediateSize)
        numHiddenLayers = try c.decode(Int.self, forKey: .numHiddenLayers)
        numAttentionHeads = try c.decode(Int.self, forKey: .numAttentionHeads)
        numKeyValueHeads = try c.decodeIfPresent(Int.self, forKey: .numKeyValueHeads) ?? numAttentionHeads
        headDim = try c.decodeIfPresent(Int.self, forKey: .headDim) ?? hiddenSize / max(numAttentionHeads, 1)
        maxPositionEmbeddings = try c.decodeIfPresent(Int.self, forKey: .maxPositionEmbeddings) ?? 2048
        rmsNormEps = try c.decodeIfPresent(Float.self, forKey: .rmsNormEps) ?? 1e-6
        // transformers ≥ 5 nests θ in rope_parameters; older configs have rope_theta and rope_scaling.
        let nested = try c.decodeIfPresent(RopeParameters.self, forKey: .ropeParameters)
        let scaling = try c.decodeIfPresent(RopeParameters.self, forKey: .ropeScaling)
        ropeTheta = try nested?.ropeTheta ?? c.decodeIfPresent(Float.self, forKey: .ropeTheta) ?? 10000
        ropeType = nested?.ropeType ?? scaling?.ropeType ?? scaling?.type ?? "default"
        tieWordEmbeddings = try c.decodeIfPresent(Bool.self, forKey: .tieWordEmbeddings) ?? false
        attentionBias = try c.decodeIfPresent(Bool.self, forKey: .attentionBias) ?? false
        mlpBias = try c.decodeIfPresent(Bool.self, forKey: .mlpBias) ?? false
        hiddenAct = try c.decodeIfPresent(String.self, forKey: .hiddenAct) ?? "silu"
        bosTokenId = try c.decodeIfPresent(Int.self, forKey: .bosTokenId)
        eosTokenId = try c.decodeIfPresent(Int.self, forKey: .eosTokenId)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(vocabSize, forKey: .vocabSize); try c.encode(hiddenSize, forKey: .hiddenSize)
        try c.encode(intermediateSize, forKey: .intermediateSize); try c.encode(numHiddenLayers, forKey: .numHiddenLayers)
        try c.encode(numAttentionHeads, forKey: .numAttentionHeads); try c.encode(numKeyValueHeads, forKey: .numKeyValueHeads)
        try c.encode(headDim, forKey: .headDim); try c.encode(maxPositionEmbeddings, forKey: .maxPositionEmbeddings)
        try c.encode(rmsNormEps, forKey: .rmsNormEps)
        try c.encode(RopeParameters(ropeTheta: ropeTheta, ropeType: ropeType, type: nil), forKey: .ropeParameters)
        try c.encode(tieWordEmbeddings, forKey: .tieWordEmbeddings); try c.encode(attentionBias, forKey: .attentionBias)
        try c.encode(mlpBias, forKey: .mlpBias); try c.encode(hiddenAct, forKey: .hiddenAct)
        try c.encodeIfPresent(bosTokenId, forKey: .bosTokenId); try c.encodeIfPresent(eosTokenId, forKey: .eosTokenId)
    }

    func validate(file: String) throws {
        func positive(_ v: Int, _ f: String) throws {
            if v <= 0 { throw LMError.invalidConfig(file: file, field: f, reason: "must be positive, got \(v)") }
        }
        try positive(vocabSize, "vocab_size"); try positive(hiddenSize, "hidden_size")
        try positive(intermediateSize, "intermediate_size"); try positive(numHiddenLayers, "num_hidden_layers")
        try positive(numAttentionHeads, "num_attention_heads"); try positive(numKeyValueHeads, "num_key_value_heads")
        try positive(headDim, "head_dim"); try positive(maxPositionEmbeddings, "max_position_embeddings")
        if numAttentionHeads % numKeyValueHeads != 0 {
            throw LMError.invalidConfig(file: file, field: "num_key_value_heads",
                                        reason: "\(numKeyValueHeads) does not divide num_attention_heads \(numAttentionHeads)")
        }
        if headDim % 2 != 0 { throw LMError.invalidConfig(file: file, field: "head_dim", reason: "must be even for rotary embeddings") }
        if hiddenAct != "silu" { throw LMError.invalidConfig(file: file, field: "hidden_act", reason: "\"\(hiddenAct)\" is not supported (silu)") }
        if ropeType != "default" {
            throw LMError.invalidConfig(file: file, field: "rope_parameters", reason: "rope_type \"\(ropeType)\" is not supported (default)")
        }
    }

    /// The architecture: RMSNorm, rotary positions (rotate-half), separate q/k/v with grouped heads
    /// ([out, in] weights), SwiGLU MLP, tied or untied head.
    public func spec() -> TransformerSpec {
        TransformerSpec(
            modelType: "llama", vocabSize: vocabSize, hidden: hiddenSize, layers: numHiddenLayers, heads: numAttentionHeads,
            kvHeads: numKeyValueHeads, headDim: headDim, intermediate: intermediateSize, maxPositions: maxPositionEmbeddings,
            norm: .rms(eps: rmsNormEps), positions: .rotary(theta: ropeTheta), mlp: .swiglu, tiedHead: tieWordEmbeddings,
            attentionBias: attentionBias, mlpBias: mlpBias, layout: .outIn,
            names: .init(tokenEmbedding: "model.embed_tokens", positionEmbedding: nil, finalNorm: "model.norm",
                         head: "lm_head", layerPrefix: { "model.layers.\($0)" }, norm1: "input_layernorm",
                         norm2: "post_attention_layernorm", qkv: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                         attnOut: "self_attn.o_proj", mlpIn: ["mlp.gate_proj", "mlp.up_proj"], mlpOut: "mlp.down_proj"))
    }
}
