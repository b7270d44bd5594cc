import Foundation
import LanguageModel
import TensorCore
import Tokenizers

/// Settings of the fine-tuning baseline.
public struct FineTuneConfig: Codable, Sendable {
    public var method = EditorMethod.ft
    public var modules: [String] = []
    /// Adam steps per edit on the edit's loss, and their learning rate.
    public var steps = 10
    public var learningRate: Float = 1e-4
    /// Stop an edit early once its loss (mean −log p per target token) is below this.
    public var targetLoss: Float = 0.05

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case method, modules, steps, learningRate = "learning_rate", targetLoss = "target_loss"
    }
}

/// The FT baseline: fine-tunes ΔW (and Δb) of the same modules on each edit's loss, in order, with Adam,
/// keeping the base weights untouched like the other editors.
public final class FineTuneEditor: SequentialEditor {
    public let config: FineTuneConfig
    public let model: TransformerLM
    public let tokenizer: Tokenizer
    public var moduleNames: [String] { config.modules }
    public var method: EditorMethod { .ft }

    public init(config: FineTuneConfig, model: TransformerLM, tokenizer: Tokenizer) throws {
        for m in config.modules where model.linears[m] == nil { throw EditingError.unknownModule(m) }
        self.config = config; self.model = model; self.tokenizer = tokenizer
    }

    public func newState() -> EditorState { EditState(moduleNames: config.modules) }

    public func restoreState(_ tensors: [String: Tensor]) throws -> EditorState {
        try EditState(moduleNames: config.modules, tensors: tensors)
    }

    /// Writes `editor.json` (the settings; FT has no weights).
    public func save(to folder: URL) throws { try EditorRegistry.writeConfig(config, to: folder) }

    /// Loads an `editor.json` with `method: ft`.
    public static func load(from folder: URL, model: TransformerLM, tokenizer: Tokenizer) throws -> FineTuneEditor {
        try FineTuneEditor(config: EditorRegistry.readConfig(FineTuneConfig.self, from: folder), model: model, tokenizer: tokenizer)
    }

    @discardableResult
    public func apply(_ requests: [EditRequest], to anyState: EditorState) throws -> EditTimings {
        let state = try own(anyState, as: EditState.self)
        var times = EditTimings()
        for m in config.modules {
            let lin = model.linears[m]!
            let st = state.modules[m]!
            if st.deltaWeight == nil { st.deltaWeight = Tensor(shape: [lin.inFeatures, lin.outFeatures]) }
            if st.deltaBias == nil { st.deltaBias = Tensor(shape: [lin.outFeatures]) }
        }
        install(state)
        let params = config.modules.flatMap { m -> [Parameter] in
            let st = state.modules[m]!
            return [Parameter(name: "dW." + m, value: st.deltaWeight!, decay: false), Parameter(name: "db." + m, value: st.deltaBias!, decay: false)]
        }
        for r in requests {
            let t0 = Date()
            let item = scored(r.prompt, r.targetNew)
            guard !item.targetIds.isEmpty else { throw EditingError.invalidInput("edit \"\(r.prompt)\": empty target") }
            let (batch, labels, mask) = DAFNetEditor.lossBatch([item])
            let opt = AdamW(params: params, learningRate: config.learningRate)
            for _ in 0..<config.steps {
                let logits = model.forward(batch)
                let d = Tensor(shape: logits.shape)
                let maskSum = max(mask.reduce(0, +), 1)
                let loss = Kernels.crossEntropy(losses: nil, dlogits: d.data, logits: logits.data, labels: labels, mask: mask,
                                                N: batch.B * batch.T, V: model.spec.vocabSize, gradScale: 1 / maskSum).sum / maskSum
                if loss < config.targetLoss { break }
                let caps = model.backward(dlogits: d, parameterGradients: false, capture: Set(config.modules))
                opt.zeroGrad()
                for (i, m) in config.modules.enumerated() {
                    let s = caps[m]!
                    let inF = s.u.shape[1], outF = s.delta.shape[1], N = s.u.shape[0]
                    BLAS.gemm(params[2 * i].grad.data, s.u.data, s.delta.data, M: inF, N: outF, K: N, transA: true, beta: 1)
                    for n in 0..<N { BLAS.axpy(params[2 * i + 1].grad.data, s.delta.data + n * outF, count: outF, alpha: 1) }
                }
                opt.update()
            }
            times.apply += Date().timeIntervalSince(t0)
        }
        state.editCount += requests.count
        return times
    }
}
