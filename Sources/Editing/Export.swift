import Foundation
import LanguageModel
import Storage
import TensorCore

/// Writes a model with an edit state merged into its base weights (W + ΔW, b + Δb) as an HF folder that
/// `transformers` and `dafnet` load.
public enum EditedModelExport {
    /// Installs the ΔW/Δb named in `tensors` (`delta_weight.<module>`, `delta_bias.<module>`) on `model`.
    public static func install(_ tensors: [String: Tensor], on model: TransformerLM) throws {
        model.clearEdits()
        for (name, t) in tensors {
            for (prefix, isWeight) in [("delta_weight.", true), ("delta_bias.", false)] where name.hasPrefix(prefix) {
                let m = String(name.dropFirst(prefix.count))
                guard let lin = model.linears[m] else { throw EditingError.unknownModule(m) }
                if isWeight {
                    guard t.count == lin.inFeatures * lin.outFeatures else {
                        throw EditingError.shapeMismatch(name: name, expected: [lin.inFeatures, lin.outFeatures], found: t.shape, file: "edit state")
                    }
                    lin.deltaWeight = t.reshaped([lin.inFeatures, lin.outFeatures])
                } else {
                    guard lin.bias != nil else {
                        throw EditingError.invalidInput("\(m) has no bias to merge its Δb into")
                    }
                    guard t.count == lin.outFeatures else {
                        throw EditingError.shapeMismatch(name: name, expected: [lin.outFeatures], found: t.shape, file: "edit state")
                    }
                    lin.deltaBias = t.reshaped([lin.outFeatures])
                }
            }
        }
    }

    public static func export(model folder: ModelFolder, state tensors: [String: Tensor], to out: URL,
                              dtype: SafetensorsDType = .F32) throws {
        try install(tensors, on: folder.model)
        defer { folder.model.clearEdits() }
        try ModelFolder.write(model: folder.model, configData: folder.configData, to: out, tokenizerFrom: folder.url,
                              dtype: dtype, mergeEdits: true)
    }
}
