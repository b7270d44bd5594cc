import Foundation
import LanguageModel
import Storage
import TensorCore

/// Writes a model with an edit state merged into its base weights (W + ΔW, b + Δb) as an HF folder that
/// `transformers` and `dafnet` load.
public enum EditedModelExport {
    /// Installs the ΔW/Δb named in `tensors` (`delta_weight.<module>`, `delta_bias.<module>`, and frozen
    /// shards' `shard_delta.<s>.<module>`) on `model`, with the state's router when it has one (`route.*`,
    /// see `RouteTensors`).
    public static func install(_ tensors: [String: Tensor], on model: TransformerLM) throws {
        model.clearEdits()
        let router = try RouteTensors.router(from: tensors)
        if let router {
            guard router.layer < model.spec.layers, router.width == model.spec.hidden else {
                throw EditingError.invalidInput("edit state: its router reads block \(router.layer) of width \(router.width); the model has \(model.spec.layers) blocks of \(model.spec.hidden)")
            }
        }
        model.router = router
        for (m, shards) in try ShardTensors.frozen(in: tensors) {
            guard let lin = model.linears[m] else { throw EditingError.unknownModule(m) }
            for (i, t) in shards.enumerated() where t.count != lin.inFeatures * lin.outFeatures {
                throw EditingError.shapeMismatch(name: ShardTensors.name(shard: i, module: m), expected: [lin.inFeatures, lin.outFeatures],
                                                 found: t.shape, file: "edit state")
            }
            lin.frozenDeltaWeights = shards.map { $0.reshaped([lin.inFeatures, lin.outFeatures]) }
        }
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

    /// Where an exported folder came from, written beside its `config.json` as `provenanceFile`.
    public struct Provenance: Codable, Sendable, Equatable {
        public var format = "dafnet-export/1"
        /// The checkpoint store's folder and the version exported.
        public var store: String
        public var version: Int
        public var stateSHA256: String
        public var baseModelSHA256: String?
        public var time: String
        public var dtype: String

        public init(store: String, version: Int, stateSHA256: String, baseModelSHA256: String?, dtype: SafetensorsDType) {
            self.store = store; self.version = version; self.stateSHA256 = stateSHA256; self.baseModelSHA256 = baseModelSHA256
            self.time = Timestamp.now(); self.dtype = dtype.rawValue
        }

        enum CodingKeys: String, CodingKey {
            case format, store, version, time, dtype, stateSHA256 = "state_sha256", baseModelSHA256 = "base_model_sha256"
        }
    }

    public static let provenanceFile = "dafnet-export.json"

    /// A routed state (`route_threshold`) applies its edits only to inputs near an edit's key, which a
    /// plain model folder cannot express: it is refused unless `unrouted`, which merges ΔW for every input
    /// (what the editor without routing would give). A state with frozen shards (`ls_shard_edits`) has no
    /// single ΔW to merge and is refused either way.
    public static func export(model folder: ModelFolder, state tensors: [String: Tensor], to out: URL,
                              dtype: SafetensorsDType = .F32, provenance: Provenance? = nil, unrouted: Bool = false) throws {
        if tensors.keys.contains(where: { $0.hasPrefix(ShardTensors.prefix) }) { throw EditingError.shardedExport }
        if RouteTensors.present(in: tensors) && !unrouted {
            throw EditingError.routedExport
        }
        try install(tensors, on: folder.model)
        defer { folder.model.clearEdits() }
        try ModelFolder.write(model: folder.model, configData: folder.configData, to: out, tokenizerFrom: folder.url,
                              dtype: dtype, mergeEdits: true)
        if let provenance {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            try FileUtil.writeAtomically(try enc.encode(provenance), to: out.appendingPathComponent(provenanceFile).path)
        }
    }
}
