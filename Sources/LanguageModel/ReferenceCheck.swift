import Foundation
import Storage
import TensorCore
import Tokenizers

/// One line of a reference comparison: the largest error found and the bound it must stay under.
public struct ReferenceRow: Codable, Sendable {
    public var check: String
    /// Largest error (absolute, or relative to the reference's largest magnitude; 0/1 for exact checks).
    public var error: Double
    public var tolerance: Double
    public var kind: String
    public var passed: Bool { error <= tolerance && !error.isNaN }

    public init(check: String, error: Double, tolerance: Double, kind: String) {
        self.check = check; self.error = error; self.tolerance = tolerance; self.kind = kind
    }
}

public struct ReferenceReport: Codable, Sendable {
    public var folder: String
    public var rows: [ReferenceRow]
    public var passed: Bool { rows.allSatisfy(\.passed) }

    public init(folder: String, rows: [ReferenceRow]) { self.folder = folder; self.rows = rows }

    /// A fixed-width table.
    public func table() -> String {
        var lines = ["check                                                   kind        max error    tolerance  ok"]
        for r in rows {
            let name = r.check.count > 55 ? "…" + r.check.suffix(54) : r.check
            lines.append(name.padding(toLength: 56, withPad: " ", startingAt: 0) + r.kind.padding(toLength: 10, withPad: " ", startingAt: 0)
                         + String(format: " %11.3e  %11.3e  ", r.error, r.tolerance) + (r.passed ? "yes" : "NO"))
        }
        let failed = rows.filter { !$0.passed }.count
        lines.append(failed == 0 ? "all \(rows.count) checks passed" : "\(failed) of \(rows.count) checks FAILED")
        return lines.joined(separator: "\n")
    }
}

/// Compares a model folder with numbers computed by Hugging Face `transformers` (`reference.json` and
/// `reference.safetensors`, the layout of the project's `gpt2-tiny` fixture): tokenization, logits,
/// loss, every parameter gradient, the gradient signals and greedy output.
public enum LanguageModelReference {
    /// Tolerances the fixtures document: float32 on BLAS supports 1e-4 absolute on logits and loss,
    /// 1e-4 relative (to the tensor's largest magnitude) on gradients and signals; exact tokens.
    public static let logitsTolerance = 1e-4
    public static let gradientTolerance = 1e-4

    public static func check(folder: URL) throws -> ReferenceReport {
        let jsonURL = folder.appendingPathComponent("reference.json")
        guard FileManager.default.fileExists(atPath: jsonURL.path) else { throw LMError.missingFile(jsonURL.path) }
        guard let ref = try JSONSerialization.jsonObject(with: Data(contentsOf: jsonURL)) as? [String: Any] else {
            throw LMError.invalidConfig(file: jsonURL.path, field: "(document)", reason: "not a JSON object")
        }
        let tensors = try SafetensorsFile(contentsOf: folder.appendingPathComponent("reference.safetensors"))
        let loaded = try ModelFolder.load(folder)
        let model = loaded.model
        var rows: [ReferenceRow] = []

        func field<T>(_ o: [String: Any], _ key: String, _ path: String) throws -> T {
            guard let v = o[key] as? T else {
                throw LMError.invalidConfig(file: jsonURL.path, field: path + key, reason: "missing or of the wrong type")
            }
            return v
        }

        // Tokenization: exact ids, tokens and decoded text.
        if let entries = ref["tokenization"] as? [[String: Any]] {
            guard let tok = loaded.tokenizer else { throw LMError.missingFile(folder.appendingPathComponent("tokenizer.json").path) }
            for (i, e) in entries.enumerated() {
                let text: String = try field(e, "text", "tokenization[\(i)].")
                let ids: [Int] = try field(e, "ids", "tokenization[\(i)].")
                var mismatch = tok.encode(text) == ids ? 0.0 : 1.0
                if let tokens = e["tokens"] as? [String], tok.tokens(for: ids) != tokens { mismatch = 1 }
                if let decoded = e["decoded"] as? String, tok.decode(ids) != decoded { mismatch = 1 }
                rows.append(ReferenceRow(check: "tokenization[\(i)] \(text.prefix(24).debugDescription)", error: mismatch,
                                         tolerance: 0, kind: "exact"))
            }
        }

        // Logits of each input sequence.
        let atol = ((ref["logits"] as? [String: Any])?["atol"] as? Double) ?? logitsTolerance
        let logitKeys = ((ref["logits"] as? [String: Any])?["keys"] as? [String])
            ?? tensors.tensorNames.filter { $0.hasPrefix("logits.") }
        for key in logitKeys {
            let suffix = key.dropFirst("logits.".count)
            let ids = try tensors.integers("input_ids.\(suffix)")
            let expected = try tensors.tensor(key)
            let logits = model.forward(TokenBatch(ids))
            rows.append(ReferenceRow(check: key, error: Double(logits.maxAbsDifference(expected)), tolerance: atol, kind: "abs"))
        }

        // The edit example: loss, every gradient, the signals.
        if let edit = ref["edit"] as? [String: Any] {
            let ids = try tensors.integers("edit.input_ids")
            let labels = try tensors.integers("edit.label_ids").map(Int32.init)
            let mask = try tensors.tensor("edit.mask").array
            let lossKey = (edit["loss_key"] as? String) ?? "edit.loss"
            let modules = (edit["modules"] as? [String]) ?? []
            model.zeroGradients()
            let logits = model.forward(TokenBatch(ids))
            let dlogits = Tensor(shape: logits.shape)
            let (loss, _) = Kernels.crossEntropy(losses: nil, dlogits: dlogits.data, logits: logits.data, labels: labels,
                                                 mask: mask, N: ids.count, V: model.spec.vocabSize)
            let expectedLoss = try tensors.tensor(lossKey)[0]
            rows.append(ReferenceRow(check: lossKey, error: Double(abs(loss - expectedLoss)), tolerance: atol, kind: "abs"))
            let signals = model.backward(dlogits: dlogits, capture: Set(modules))
            for name in tensors.tensorNames where name.hasPrefix("grad.") {
                let pname = String(name.dropFirst("grad.".count))
                guard let p = model.parameter(pname) else { throw LMError.missingTensor(name: pname, file: "model") }
                rows.append(relative("grad.\(pname)", p.grad, try tensors.tensor(name)))
            }
            for m in modules {
                guard let s = signals[m] else { throw LMError.invalidInput("module \(m) is not a linear module of the model") }
                rows.append(relative("signal.\(m).u", s.u, try tensors.tensor("signal.\(m).u")))
                rows.append(relative("signal.\(m).delta", s.delta, try tensors.tensor("signal.\(m).delta")))
            }
        }

        // Greedy continuation with the key/value cache.
        if let greedy = ref["greedy"] as? [String: Any] {
            let prompt: [Int] = try field(greedy, "prompt_ids", "greedy.")
            let expected: [Int] = try field(greedy, "output_ids", "greedy.")
            let out = try model.generateGreedy(prompt: prompt, maxNewTokens: expected.count - prompt.count)
            rows.append(ReferenceRow(check: "greedy \(expected.count - prompt.count) tokens", error: out == expected ? 0 : 1,
                                     tolerance: 0, kind: "exact"))
        }
        return ReferenceReport(folder: folder.path, rows: rows)
    }

    static func relative(_ name: String, _ got: Tensor, _ expected: Tensor) -> ReferenceRow {
        guard got.count == expected.count else {
            return ReferenceRow(check: name + " (shape \(got.shape) vs \(expected.shape))", error: .infinity, tolerance: gradientTolerance, kind: "rel")
        }
        let scale = max(Double(expected.maxAbs()), 1e-12)
        return ReferenceRow(check: name, error: Double(got.maxAbsDifference(expected)) / scale, tolerance: gradientTolerance, kind: "rel")
    }
}
