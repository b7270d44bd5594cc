import Foundation
import LanguageModel
import Storage
import TensorCore
import Tokenizers

/// The editor's committed configuration (`editor.json`): the edited modules, the auxiliary network's
/// sizes, the method, and the meta-training settings.
public struct EditorConfig: Codable, Sendable {
    /// `dafnet` (inter-edit fusion) or `mend` (the same per-token network, plain accumulation).
    public var method = "dafnet"
    /// HF names of the edited linear modules.
    public var modules: [String] = []
    public var editBias = true
    public var auxModel = AuxNetConfig()
    /// Initial per-module edit learning rate (learned during meta-training).
    public var initEditLR: Float = 1e-3
    public var training = MetaTrainingConfig()

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case method, modules, editBias = "edit_bias", auxModel = "aux_model", initEditLR = "init_edit_lr", training
    }

    /// The default for a GPT-2 model: the MLP `c_fc` and `c_proj` of the last three blocks.
    public static func defaultModules(for spec: TransformerSpec) -> [String] {
        let first = max(0, spec.layers - 3)
        return (first..<spec.layers).flatMap { l -> [String] in
            let p = spec.names.layerPrefix(l) + "."
            return (spec.names.mlpIn + [spec.names.mlpOut]).map { p + $0 }
        }
    }
}

/// Meta-training settings (losses, curriculum, optimiser, schedule of checkpoints and logs).
public struct MetaTrainingConfig: Codable, Sendable {
    public var steps = 3000
    public var seed: UInt64 = 7
    public var auxLR: Float = 1e-4
    public var editLRLR: Float = 1e-3
    public var reliaLambda: Float = 0.1
    public var genLambda: Float = 0.1
    public var locLambda: Float = 1.0
    /// The curriculum: episodes start with sequences of 1 edit; the longest grows by `growBy` every
    /// `growEvery` steps up to `maxSeq`.
    public var maxSeq = 8
    public var growEvery = 200
    public var growBy = 1
    public var gradClip: Float = 100
    public var checkpointEvery = 100
    public var logEvery = 10

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case steps, seed, auxLR = "aux_lr", editLRLR = "edit_lr_lr", reliaLambda = "relia_lambda", genLambda = "gen_lambda"
        case locLambda = "loc_lambda", maxSeq = "max_seq", growEvery = "grow_every", growBy = "grow_by", gradClip = "grad_clip"
        case checkpointEvery = "checkpoint_every", logEvery = "log_every"
    }
}

/// Everything needed to continue a sequence of edits exactly: per module ΔW, Δb and the auxiliary
/// network's past sample representations (one row per edit per layer), and the edit count.
/// Memory grows by `layer_n × (in + out)` floats per edit per module.
public final class EditState: @unchecked Sendable {
    public final class Module {
        public var deltaWeight: Tensor?
        public var deltaBias: Tensor?
        public var pastReps: [Tensor] = []
        init() {}
    }

    public private(set) var modules: [String: Module] = [:]
    public var editCount = 0

    public init(moduleNames: [String]) {
        for m in moduleNames { modules[m] = Module() }
    }

    /// Named tensors for the checkpoint store: `delta_weight.<m>`, `delta_bias.<m>`, `reps.<m>.<layer>`,
    /// and `edit_count`.
    public func tensors() -> [String: Tensor] {
        var out: [String: Tensor] = ["edit_count": Tensor(shape: [1], values: [Float(editCount)])]
        for (name, m) in modules {
            if let w = m.deltaWeight { out["delta_weight." + name] = w }
            if let b = m.deltaBias { out["delta_bias." + name] = b }
            for (l, r) in m.pastReps.enumerated() { out["reps.\(name).\(l)"] = r }
        }
        return out
    }

    /// Rebuilds a state from `tensors()`; names outside `moduleNames` are an error.
    public convenience init(moduleNames: [String], tensors: [String: Tensor]) throws {
        self.init(moduleNames: moduleNames)
        for (key, t) in tensors {
            if key == "edit_count" { editCount = Int(t[0]); continue }
            let parts = key.split(separator: ".", maxSplits: 1).map(String.init)
            guard parts.count == 2 else { throw EditingError.invalidInput("edit state: unexpected tensor \"\(key)\"") }
            switch parts[0] {
            case "delta_weight", "delta_bias":
                guard let m = modules[parts[1]] else { throw EditingError.unknownModule(parts[1]) }
                if parts[0] == "delta_weight" { m.deltaWeight = t.copy() } else { m.deltaBias = t.copy() }
            case "reps":
                guard let dot = parts[1].lastIndex(of: "."), let l = Int(parts[1][parts[1].index(after: dot)...]),
                      let m = modules[String(parts[1][..<dot])] else {
                    throw EditingError.invalidInput("edit state: bad representation name \"\(key)\"")
                }
                while m.pastReps.count <= l { m.pastReps.append(Tensor(shape: [0, t.shape.last ?? 0])) }
                m.pastReps[l] = t.copy()
            default:
                throw EditingError.invalidInput("edit state: unexpected tensor \"\(key)\"")
            }
        }
    }

    public func copy() -> EditState {
        let s = EditState(moduleNames: Array(modules.keys))
        s.editCount = editCount
        for (k, m) in modules {
            s.modules[k]!.deltaWeight = m.deltaWeight?.copy()
            s.modules[k]!.deltaBias = m.deltaBias?.copy()
            s.modules[k]!.pastReps = m.pastReps.map { $0.copy() }
        }
        return s
    }

    /// Bytes held.
    public var byteCount: Int { tensors().values.reduce(0) { $0 + $1.count * 4 } }
}

/// Per-module gradient signal rows `[u | δ]` of a batch of edits, one segment per edit.
public struct ModuleSignals {
    public var x: Tensor
    public var lengths: [Int]
}

/// Timings of one edit call, in seconds.
public struct EditTimings: Codable, Sendable {
    public var signal = 0.0
    public var auxiliary = 0.0
    public var apply = 0.0
    public var total: Double { signal + auxiliary + apply }

    public init() {}
}

/// DAFNet (or its MEND-like ablation): gradient signals from the unedited model → the auxiliary network of
/// each module's shape → `ΔW ← s_past·ΔW + lr·x1ᵀx2`, installed as module edits of the model.
public final class DAFNetEditor: @unchecked Sendable {
    public let config: EditorConfig
    public let model: TransformerLM
    public let tokenizer: Tokenizer
    /// One network per module shape, keyed "in×out".
    public let networks: [String: AuxiliaryNetwork]
    /// Per module: its network key and mode.
    public let routing: [String: (key: String, mode: Int)]
    /// Learned per-module edit learning rates, [1] each.
    public let editLRs: [String: Parameter]

    public var fusion: Bool { config.method == "dafnet" }

    public init(config: EditorConfig, model: TransformerLM, tokenizer: Tokenizer) throws {
        guard ["dafnet", "mend"].contains(config.method) else {
            throw EditingError.invalidConfig(file: "editor.json", field: "method", reason: "\"\(config.method)\" is not dafnet or mend")
        }
        guard !config.modules.isEmpty else { throw EditingError.invalidConfig(file: "editor.json", field: "modules", reason: "empty") }
        self.config = config; self.model = model; self.tokenizer = tokenizer
        var shapes: [String: [String]] = [:]
        var order: [String] = []
        for m in config.modules {
            guard let lin = model.linears[m] else { throw EditingError.unknownModule(m) }
            let key = "\(lin.inFeatures)x\(lin.outFeatures)"
            if shapes[key] == nil { order.append(key) }
            shapes[key, default: []].append(m)
        }
        var nets: [String: AuxiliaryNetwork] = [:]
        var routing: [String: (String, Int)] = [:]
        for key in order {
            let ms = shapes[key]!
            let lin = model.linears[ms[0]]!
            nets[key] = AuxiliaryNetwork(xDim: lin.inFeatures, deltaDim: lin.outFeatures, modes: ms.count, config: config.auxModel)
            for (i, m) in ms.enumerated() { routing[m] = (key, i) }
        }
        networks = nets
        self.routing = routing
        editLRs = Dictionary(uniqueKeysWithValues: config.modules.map {
            ($0, Parameter(name: "edit_lr." + $0, value: Tensor(shape: [1], values: [config.initEditLR]), decay: false))
        })
    }

    /// Every trainable parameter: the networks' and the edit learning rates.
    public var trainableParameters: [Parameter] {
        networks.keys.sorted().flatMap { k in networks[k]!.parameters.map { Parameter(name: "\(k)/" + $0.name, value: $0.value, grad: $0.grad, decay: false) } }
            + config.modules.map { editLRs[$0]! }
    }

    public func initialise(seed: UInt64) {
        var rng = RNG(seed: seed)
        for k in networks.keys.sorted() { networks[k]!.initialise(rng: &rng) }
    }

    // MARK: Sequences

    /// prompt + target (the target with a leading space), scored on the target tokens.
    public func scored(_ prompt: String, _ target: String) -> ScoredPrompt {
        ScoredPrompt(prompt: prompt, target: target, tokenizer: tokenizer)
    }

    /// A right-padded batch with labels and a mask on the answer tokens.
    public static func lossBatch(_ items: [ScoredPrompt]) -> (batch: TokenBatch, labels: [Int32], mask: [Float]) {
        let inputs = items.map { $0.promptIds + $0.targetIds.dropLast() }
        let batch = TokenBatch(rightPadded: inputs)
        var labels = [Int32](repeating: -1, count: batch.B * batch.T)
        var mask = [Float](repeating: 0, count: batch.B * batch.T)
        for (b, it) in items.enumerated() {
            let full = it.promptIds + it.targetIds
            for t in 0..<(full.count - 1) {
                labels[b * batch.T + t] = Int32(full[t + 1])
                if t + 1 >= it.promptIds.count { mask[b * batch.T + t] = 1 }
            }
        }
        return (batch, labels, mask)
    }

    // MARK: Gradient signals

    /// Signals of the *unedited* model on the edits' loss −Σ mask·log p(target): per module, the rows
    /// `[u | δ]` of the positions where both are non-zero, one segment per edit.
    public func signals(_ edits: [ScoredPrompt]) -> [String: ModuleSignals] {
        let (batch, labels, mask) = Self.lossBatch(edits)
        return model.withoutEdits {
            let logits = model.forward(batch)
            let d = Tensor(shape: logits.shape)
            Kernels.crossEntropy(losses: nil, dlogits: d.data, logits: logits.data, labels: labels, mask: mask,
                                 N: batch.B * batch.T, V: model.spec.vocabSize)
            let caps = model.backward(dlogits: d, parameterGradients: false, capture: Set(config.modules))
            var out: [String: ModuleSignals] = [:]
            for m in config.modules {
                let s = caps[m]!
                let inF = s.u.shape[1], outF = s.delta.shape[1]
                var rows: [Int] = []
                var lengths: [Int] = []
                for b in 0..<batch.B {
                    var n = 0
                    for t in 0..<batch.T {
                        let r = b * batch.T + t
                        let u = s.u.data + r * inF, dl = s.delta.data + r * outF
                        var uNZ = false, dNZ = false
                        for i in 0..<inF where u[i] != 0 { uNZ = true; break }
                        for i in 0..<outF where dl[i] != 0 { dNZ = true; break }
                        if uNZ && dNZ { rows.append(r); n += 1 }
                    }
                    lengths.append(max(n, 0))
                }
                let x = Tensor(shape: [rows.count, inF + outF])
                for (i, r) in rows.enumerated() {
                    (x.data + i * (inF + outF)).update(from: s.u.data + r * inF, count: inF)
                    (x.data + i * (inF + outF) + inF).update(from: s.delta.data + r * outF, count: outF)
                }
                out[m] = ModuleSignals(x: x, lengths: lengths)
            }
            return out
        }
    }

    // MARK: Editing

    /// Installs a state's ΔW/Δb as the model's module edits.
    public func install(_ state: EditState) {
        for m in config.modules {
            let lin = model.linears[m]!
            lin.deltaWeight = state.modules[m]?.deltaWeight
            lin.deltaBias = state.modules[m]?.deltaBias
        }
    }

    /// Applies `requests` in order as one call of the networks (each edit attends causally to the earlier
    /// ones and to the state's past), folds the result into `state`, and installs it on the model.
    @discardableResult
    public func apply(_ requests: [EditRequest], to state: EditState) throws -> EditTimings {
        guard !requests.isEmpty else { return EditTimings() }
        var times = EditTimings()
        var t0 = Date()
        let edits = requests.map { scored($0.prompt, $0.targetNew) }
        for (i, e) in edits.enumerated() where e.targetIds.isEmpty || e.promptIds.count + e.targetIds.count > model.spec.maxPositions {
            throw EditingError.invalidInput("edit \(i): prompt + target must have 1…\(model.spec.maxPositions) tokens")
        }
        let sig = signals(edits)
        times.signal = Date().timeIntervalSince(t0)
        t0 = Date()
        var updates: [(String, Tensor, Tensor, Float)] = []
        for m in config.modules {
            let (key, mode) = routing[m]!
            guard let s = sig[m], s.lengths.allSatisfy({ $0 > 0 }) else {
                throw EditingError.invalidInput("module \(m): an edit produced no gradient signal")
            }
            let st = state.modules[m]!
            let out = networks[key]!.forward(tape: Tape(recording: false), x: s.x, lengths: s.lengths, mode: mode,
                                             pastReps: st.pastReps.isEmpty ? nil : st.pastReps, trainingNorm: false,
                                             fusion: fusion)
            if fusion { st.pastReps = out.newReps }  // MEND keeps no sequence representations
            updates.append((m, out.deltaWeight.value, out.deltaBias.value, fusion ? out.pastUpdateScale : 1))
        }
        times.auxiliary = Date().timeIntervalSince(t0)
        t0 = Date()
        for (m, dW, db, pus) in updates {
            let st = state.modules[m]!
            let lr = editLRs[m]!.value[0]
            st.deltaWeight = Self.accumulate(st.deltaWeight, decay: pus, new: dW, lr: lr)
            if config.editBias { st.deltaBias = Self.accumulate(st.deltaBias, decay: pus, new: db, lr: lr) }
        }
        state.editCount += requests.count
        install(state)
        times.apply = Date().timeIntervalSince(t0)
        return times
    }

    /// past·decay + lr·new (the first update is lr·new).
    static func accumulate(_ past: Tensor?, decay: Float, new: Tensor, lr: Float) -> Tensor {
        let out: Tensor
        if let past {
            out = past.copy()
            if decay != 1 { out.scale(decay) }
        } else {
            out = Tensor(shape: new.shape)
        }
        out.add(new, alpha: lr)
        return out
    }

    // MARK: Persistence

    public static let configFile = "editor.json"
    public static let weightsFile = "editor.safetensors"

    /// Writes `editor.json` and `editor.safetensors` (network parameters and batch-norm buffers under
    /// "<in>x<out>/<official name>", and `edit_lr.<module>`).
    public func save(to folder: URL) throws {
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        var w = SafetensorsWriter(metadata: ["format": "dafnet-editor", "method": config.method])
        for (key, net) in networks { for (n, t) in net.stateTensors() { try w.add(key + "/" + n, t) } }
        for (m, p) in editLRs { try w.add(p.name, p.value); _ = m }
        try w.write(to: folder.appendingPathComponent(Self.weightsFile))
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(config).write(to: folder.appendingPathComponent(Self.configFile), options: .atomic)
    }

    /// Loads an editor folder for `model`.
    public static func load(from folder: URL, model: TransformerLM, tokenizer: Tokenizer) throws -> DAFNetEditor {
        let cfgURL = folder.appendingPathComponent(configFile)
        guard let data = FileManager.default.contents(atPath: cfgURL.path) else {
            throw EditingError.invalidInput("\(cfgURL.path): file not found")
        }
        let config: EditorConfig
        do { config = try JSONDecoder().decode(EditorConfig.self, from: data) } catch {
            throw EditingError.invalidConfig(file: cfgURL.path, field: "(document)", reason: "\(error)")
        }
        let editor = try DAFNetEditor(config: config, model: model, tokenizer: tokenizer)
        let wURL = folder.appendingPathComponent(weightsFile)
        let f = try SafetensorsFile(contentsOf: wURL)
        for (key, net) in editor.networks { try net.load(f, prefix: key + "/", file: wURL.path) }
        for (_, p) in editor.editLRs { p.value.assign(try f.tensor(p.name)) }
        return editor
    }
}
