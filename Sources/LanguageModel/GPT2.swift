import Foundation
import TensorCore

/// `config.json` of a GPT-2 model (HF key names; unknown keys are kept by the loader).
public struct GPT2Configuration: Codable, Sendable {
    public var vocabSize: Int
    public var nPositions: Int
    public var nEmbd: Int
    public var nLayer: Int
    public var nHead: Int
    /// MLP width; null means 4 · n_embd.
    public var nInner: Int?
    public var activationFunction: String
    public var layerNormEpsilon: Float
    public var tieWordEmbeddings: Bool
    public var bosTokenId: Int?
    public var eosTokenId: Int?

    enum CodingKeys: String, CodingKey {
        case vocabSize = "vocab_size", nPositions = "n_positions", nEmbd = "n_embd", nLayer = "n_layer", nHead = "n_head"
        case nInner = "n_inner", activationFunction = "activation_function", layerNormEpsilon = "layer_norm_epsilon"
        case tieWordEmbeddings = "tie_word_embeddings", bosTokenId = "bos_token_id", eosTokenId = "eos_token_id"
    }

    public init(vocabSize: Int, nPositions: Int, nEmbd: Int, nLayer: Int, nHead: Int, nInner: Int? = nil,
                bosTokenId: Int? = 0, eosTokenId: Int? = 0) {
        self.vocabSize = vocabSize; self.nPositions = nPositions; self.nEmbd = nEmbd; self.nLayer = nLayer
        self.nHead = nHead; self.nInner = nInner; self.activationFunction = "gelu_new"; self.layerNormEpsilon = 1e-5
        self.tieWordEmbeddings = true; self.bosTokenId = bosTokenId; self.eosTokenId = eosTokenId
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vocabSize = try c.decode(Int.self, forKey: .vocabSize)
        nPositions = try c.decodeIfPresent(Int.self, forKey: .nPositions) ?? 1024
        nEmbd = try c.decode(Int.self, forKey: .nEmbd)
        nLayer = try c.decode(Int.self, forKey: .nLayer)
        nHead = try c.decode(Int.self, forKey: .nHead)
        nInner = try c.decodeIfPresent(Int.self, forKey: .nInner)
        activationFunction = try c.decodeIfPresent(String.self, forKey: .activationFunction) ?? "gelu_new"
        layerNormEpsilon = try c.decodeIfPresent(Float.self, forKey: .layerNormEpsilon) ?? 1e-5
        tieWordEmbeddings = try c.decodeIfPresent(Bool.self, forKey: .tieWordEmbeddings) ?? true
        bosTokenId = try c.decodeIfPresent(Int.self, forKey: .bosTokenId)
        eosTokenId = try c.decodeIfPresent(Int.self, forKey: .eosTokenId)
    }

    /// The config.json object for a new model folder (what `transformers` needs to load it).
    public func jsonObject() -> [String: Any] {
        var o: [String: Any] = [
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocabSize,
            "n_positions": nPositions, "n_ctx": nPositions, "n_embd": nEmbd, "n_layer": nLayer, "n_head": nHead,
            "activation_function": activationFunction, "layer_norm_epsilon": Double(layerNormEpsilon),
            "tie_word_embeddings": tieWordEmbeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": true, "scale_attn_by_inverse_layer_idx": false, "reorder_and_upcast_attn": false,
            "initializer_range": 0.02, "use_cache": true, "dtype": "float32",
        ]
        o["n_inner"] = nInner ?? NSNull()
        o["bos_token_id"] = bosTokenId ?? NSNull()
        o["eos_token_id"] = eosTokenId ?? NSNull()
        return o
    }

    func validate(file: String) throws {
        func positive(_ v: Int, _ f: String) throws {
            if v <= 0 { throw LMError.invalidConfig(file: file, field: f, reason: "must be positive, got \(v)") }
        }
        try positive(vocabSize, "vocab_size"); try positive(nPositions, "n_positions"); try positive(nEmbd, "n_embd")
        try positive(nLayer, "n_layer"); try positive(nHead, "n_head")
        if let nInner { try positive(nInner, "n_inner") }
        if nEmbd % nHead != 0 { throw LMError.invalidConfig(file: file, field: "n_head", reason: "n_embd \(nEmbd) is not divisible by n_head \(nHead)") }
        if !["gelu_new", "gelu_pytorch_tanh"].contains(activationFunction) {
            throw LMError.invalidConfig(file: file, field: "activation_function", reason: "\"\(activationFunction)\" is not supported (gelu_new)")
        }
        if !tieWordEmbeddings {
            throw LMError.invalidConfig(file: file, field: "tie_word_embeddings", reason: "untied GPT-2 heads are not supported")
        }
    }

    /// The architecture: learned positions, LayerNorm, fused Conv1D q/k/v ([in, out] weights), GELU (tanh).
    public func spec() -> TransformerSpec {
        TransformerSpec(
            modelType: "gpt2", vocabSize: vocabSize, hidden: nEmbd, layers: nLayer, heads: nHead, kvHeads: nHead,
            headDim: nEmbd / nHead, intermediate: nInner ?? 4 * nEmbd, maxPositions: nPositions,
            norm: .layer(eps: layerNormEpsilon), positions: .learned, mlp: .gelu, tiedHead: true,
            attentionBias: true, mlpBias: true, layout: .inOut,
            names: .init(tokenEmbedding: "transformer.wte", positionEmbedding: "transformer.wpe", finalNorm: "transformer.ln_f",
                         head: nil, layerPrefix: { "transformer.h.\($0)" }, norm1: "ln_1", norm2: "ln_2",
                         qkv: ["attn.c_attn"], attnOut: "attn.c_proj", mlpIn: ["mlp.c_fc"], mlpOut: "mlp.c_proj"))
    }
}
