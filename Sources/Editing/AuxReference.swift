import Foundation
import LanguageModel
import Storage
import TensorCore

/// Compares the auxiliary network with numbers from the official PyTorch modules (the layout of the
/// `dafnet-aux` fixture: reference.json, aux_model.safetensors, reference.safetensors): every step's
/// ΔW, Δb, past-update scale and representations, every parameter gradient of the probe loss, and the
/// exact batch norm's statistics, within 1e-4 relative to each tensor's largest magnitude.
public enum AuxReference {
    public static let tolerance = 1e-4

    /// Whether a folder is in this layout.
    public static func recognises(_ folder: URL) -> Bool {
        FileManager.default.fileExists(atPath: folder.appendingPathComponent("aux_model.safetensors").path)
    }

    public static func check(folder: URL) throws -> ReferenceReport {
        let jsonURL = folder.appendingPathComponent("reference.json")
        guard let data = FileManager.default.contents(atPath: jsonURL.path),
              let ref = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw EditingError.invalidConfig(file: jsonURL.path, field: "(document)", reason: "missing or not a JSON object")
        }
        func int(_ k: String) throws -> Int {
            guard let v = ref[k] as? Int else { throw EditingError.invalidConfig(file: jsonURL.path, field: k, reason: "missing or not an integer") }
            return v
        }
        guard let auxObject = ref["aux_model"] else {
            throw EditingError.invalidConfig(file: jsonURL.path, field: "aux_model", reason: "missing")
        }
        let config = try JSONDecoder().decode(AuxNetConfig.self, from: JSONSerialization.data(withJSONObject: auxObject))
        let editBias = ref["edit_bias"] as? Bool ?? true
        let net = AuxiliaryNetwork(xDim: try int("x_dim"), deltaDim: try int("delta_dim"), modes: try int("n_modes"), config: config)
        let modelFile = folder.appendingPathComponent("aux_model.safetensors")
        try net.load(SafetensorsFile(contentsOf: modelFile), file: modelFile.path)
        let tensors = try SafetensorsFile(contentsOf: folder.appendingPathComponent("reference.safetensors"))
        guard let steps = ref["steps"] as? [[String: Any]] else {
            throw EditingError.invalidConfig(file: jsonURL.path, field: "steps", reason: "missing or not a list")
        }
        var rows: [ReferenceRow] = []
        func rel(_ name: String, _ got: Tensor, _ expected: Tensor, floor: Double = 1e-12) -> ReferenceRow {
            guard got.count == expected.count else {
                return ReferenceRow(check: name + " (shape \(got.shape) vs \(expected.shape))", error: .infinity, tolerance: tolerance, kind: "rel")
            }
            let scale = max(Double(expected.maxAbs()), floor)
            return ReferenceRow(check: name, error: Double(got.maxAbsDifference(expected)) / scale, tolerance: tolerance, kind: "rel")
        }
        for p in net.parameters { p.grad.zero() }
        var repsOf: [[Tensor]] = []
        var probe: Double = 0
        for (i, step) in steps.enumerated() {
            guard let mode = step["mode"] as? Int, let lens = step["edit_lens"] as? [Int] else {
                throw EditingError.invalidConfig(file: jsonURL.path, field: "steps[\(i)]", reason: "needs mode and edit_lens")
            }
            var past: [Tensor]?
            if let from = step["past_reps_from_step"] as? Int {
                guard from >= 0 && from < repsOf.count else {
                    throw EditingError.invalidConfig(file: jsonURL.path, field: "steps[\(i)].past_reps_from_step", reason: "no step \(from) before")
                }
                past = repsOf[from]
            }
            let tape = Tape()
            let out = net.forward(tape: tape, x: try tensors.tensor("step\(i).x"), lengths: lens, mode: mode, pastReps: past, trainingNorm: false)
            let (deltaWeight, deltaBias) = out.products(tape: tape)
            repsOf.append(out.newReps)
            rows.append(rel("step\(i).delta_weight", deltaWeight.value, try tensors.tensor("step\(i).delta_weight")))
            if editBias { rows.append(rel("step\(i).delta_bias", deltaBias.value, try tensors.tensor("step\(i).delta_bias"))) }
            rows.append(rel("step\(i).past_update_scale", Tensor(shape: [1], values: [out.pastUpdateScale]), try tensors.tensor("step\(i).past_update_scale")))
            for (l, r) in out.newReps.enumerated() { rows.append(rel("step\(i).reps.\(l)", r, try tensors.tensor("step\(i).reps.\(l)"))) }
            let pw = try tensors.tensor("step\(i).probe_w")
            var seeds = [(deltaWeight, pw)]
            probe += zip(deltaWeight.value.array, pw.array).reduce(0.0) { $0 + Double($1.0 * $1.1) }
            if editBias {
                let pb = try tensors.tensor("step\(i).probe_b")
                seeds.append((deltaBias, pb))
                probe += zip(deltaBias.value.array, pb.array).reduce(0.0) { $0 + Double($1.0 * $1.1) }
            }
            tape.backward(seeds: seeds)
        }
        rows.append(rel("probe_loss", Tensor(shape: [1], values: [Float(probe)]), try tensors.tensor("probe_loss")))
        // Gradients that are mathematically zero (softmax is shift-invariant, so the biases of the score
        // logits and of the keys get none) or 10⁴ times smaller than the largest are float32 round-off
        // on both sides; they are compared relative to 1e-3 of the largest gradient of any parameter.
        let gradNames = tensors.tensorNames.filter { $0.hasPrefix("grad.") }
        let largest = try gradNames.map { Double(try tensors.tensor($0).maxAbs()) }.max() ?? 0
        for name in gradNames {
            let pname = String(name.dropFirst(5))
            guard let p = net.parameter(pname) else { throw EditingError.unknownModule(pname) }
            let expected = try tensors.tensor(name)
            if expected.maxAbs() == 0 {
                // The reference detaches the score path: its parameters get exactly zero gradient.
                rows.append(ReferenceRow(check: name + " (zero)", error: Double(p.grad.maxAbs()), tolerance: 0, kind: "abs"))
            } else {
                rows.append(rel(name, p.grad, expected, floor: 1e-3 * largest))
            }
        }
        // The exact batch norm in training mode on fresh statistics.
        var ebn = ExactBatchNorm(dim: net.dim)
        var j = 0
        while tensors.contains("ebn.in\(j)") {
            let out = ebn.forward(try tensors.tensor("ebn.in\(j)"), training: true)
            rows.append(rel("ebn.out\(j)", out, try tensors.tensor("ebn.out\(j)")))
            j += 1
        }
        if j > 0 {
            rows.append(rel("ebn.mean", ebn.mean, try tensors.tensor("ebn.mean")))
            rows.append(rel("ebn.std", ebn.std, try tensors.tensor("ebn.std")))
        }
        return ReferenceReport(folder: folder.path, rows: rows)
    }
}
