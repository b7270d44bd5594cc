import Foundation
import Storage
import TensorCore
import Tokenizers

/// The architectures `dafnet` can load, keyed by `config.json`'s `model_type`.
public enum ModelRegistry {
    public static let supportedTypes = ["gpt2", "llama"]

    /// Decodes a configuration and returns the architecture for it.
    public static func spec(configData: Data, file: String) throws -> TransformerSpec {
        let object: Any
        do { object = try JSONSerialization.jsonObject(with: configData) } catch {
            throw LMError.invalidConfig(file: file, field: "(document)", reason: "not valid JSON: \(error.localizedDescription)")
        }
        guard let dict = object as? [String: Any] else {
            throw LMError.invalidConfig(file: file, field: "(document)", reason: "the top level is not a JSON object")
        }
        guard let type = dict["model_type"] as? String else {
            throw LMError.invalidConfig(file: file, field: "model_type", reason: "missing or not a string")
        }
        do {
            switch type {
            case "gpt2":
                let c = try JSONDecoder().decode(GPT2Configuration.self, from: configData)
                try c.validate(file: file)
                return c.spec()
            case "llama":
                let c = try JSONDecoder().decode(LlamaConfiguration.self, from: configData)
                try c.validate(file: file)
                return c.spec()
            default:
                throw LMError.unsupportedModelType(type, file: file)
            }
        } catch let e as DecodingError {
            throw LMError.invalidConfig(file: file, field: Self.field(of: e), reason: Self.reason(of: e))
        }
    }

    static func field(of e: DecodingError) -> String {
        switch e {
        case let .keyNotFound(k, ctx): return (ctx.codingPath + [k]).map(\.stringValue).joined(separator: ".")
        case let .typeMismatch(_, ctx), let .valueNotFound(_, ctx), let .dataCorrupted(ctx):
            return ctx.codingPath.map(\.stringValue).joined(separator: ".")
        @unknown default: return "(unknown)"
        }
    }

    static func reason(of e: DecodingError) -> String {
        switch e {
        case .keyNotFound: return "required but missing"
        case let .typeMismatch(t, _): return "expected \(t)"
        case let .valueNotFound(t, _): return "expected \(t), found null"
        case let .dataCorrupted(ctx): return ctx.debugDescription
        @unknown default: return "invalid"
        }
    }
}

/// A Hugging Face model folder: `config.json`, `model.safetensors` (or a sharded index) and, when
/// present, `tokenizer.json`.
public final class ModelFolder: @unchecked Sendable {
    public let url: URL
    public let model: TransformerLM
    public let tokenizer: Tokenizer?
    /// The folder's config.json as read (unknown keys kept for writing back).
    public let configData: Data

    public init(url: URL, model: TransformerLM, tokenizer: Tokenizer?, configData: Data) {
        self.url = url; self.model = model; self.tokenizer = tokenizer; self.configData = configData
    }

    /// Loads a folder. Weights stored as float32, float16 or bfloat16 are computed in float32.
    public static func load(_ url: URL, requireTokenizer: Bool = false) throws -> ModelFolder {
        let configURL = url.appendingPathComponent("config.json")
        guard FileManager.default.fileExists(atPath: configURL.path) else { throw LMError.missingFile(configURL.path) }
        let configData = try Data(contentsOf: configURL)
        let spec = try ModelRegistry.spec(configData: configData, file: configURL.path)
        let model = TransformerLM(spec: spec)
        let source = try SafetensorsModel.open(directory: url)
        let file = url.appendingPathComponent(SafetensorsModel.singleFileName).path
        let available = Set(source.tensorNames)
        for p in model.parameters {
            // Original OpenAI GPT-2 checkpoints store names without the "transformer." prefix.
            let candidates = [p.name, p.name.hasPrefix("transformer.") ? String(p.name.dropFirst("transformer.".count)) : nil]
            guard let name = candidates.compactMap({ $0 }).first(where: available.contains) else {
                throw LMError.missingTensor(name: p.name, file: file)
            }
            let t = try source.tensor(name)
            guard t.shape == p.value.shape else {
                throw LMError.shapeMismatch(name: name, expected: p.value.shape, found: t.shape, file: file)
            }
            p.value.assign(t)
        }
        var tokenizer: Tokenizer?
        if FileManager.default.fileExists(atPath: url.appendingPathComponent("tokenizer.json").path) {
            tokenizer = try Tokenizer.load(folder: url)
        } else if requireTokenizer {
            throw LMError.missingFile(url.appendingPathComponent("tokenizer.json").path)
        }
        return ModelFolder(url: url, model: model, tokenizer: tokenizer, configData: configData)
    }

    /// Writes `model` as an HF folder `transformers` loads back: config.json, model.safetensors
    /// (HF names and layouts, float32 or `dtype`), and the tokenizer files copied from `tokenizerFrom`.
    public static func write(model: TransformerLM, configData: Data, to url: URL, tokenizerFrom: URL? = nil,
                             dtype: SafetensorsDType = .F32, mergeEdits: Bool = false) throws {
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        var writer = SafetensorsWriter(metadata: ["format": "pt"])
        let merged = mergeEdits ? model.mergedParameters() : [:]
        for p in model.parameters {
            try writer.add(p.name, merged[p.name] ?? p.value, as: dtype)
        }
        try writer.write(to: url.appendingPathComponent(SafetensorsModel.singleFileName))
        try configData.write(to: url.appendingPathComponent("config.json"), options: .atomic)
        if let src = tokenizerFrom {
            for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
                let from = src.appendingPathComponent(name), to = url.appendingPathComponent(name)
                guard FileManager.default.fileExists(atPath: from.path), from.standardizedFileURL != to.standardizedFileURL else { continue }
                try? FileManager.default.removeItem(at: to)
                try FileManager.default.copyItem(at: from, to: to)
            }
        }
    }
}

extension TransformerLM {
    /// Weights and biases with the module edits merged in (W + ΔW in the stored layout, b + Δb), by name;
    /// only edited parameters appear.
    public func mergedParameters() -> [String: Tensor] {
        var out: [String: Tensor] = [:]
        for m in linears.values {
            if let d = m.deltaWeight {
                let w = m.weight.value.copy()
                switch m.layout {
                case .inOut: w.add(d)                 // W [in, out]
                case .outIn: w.add(d.transposed())    // W [out, in]
                }
                out[m.weight.name] = w
            }
            if let db = m.deltaBias {
                if let b = m.bias {
                    let merged = b.value.copy()
                    merged.add(db)
                    out[b.name] = merged
                }
            }
        }
        return out
    }
}
