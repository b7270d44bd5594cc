import Foundation
import LanguageModel
import Storage
import TensorCore
import Tokenizers

/// Settings of MEMIT and AlphaEdit (`editor.json`). The defaults are the published GPT-2 XL settings of
/// MEMIT and AlphaEdit (EasyEdit / the official hparams) unless the comment says otherwise.
public struct MEMITConfig: Codable, Sendable {
    /// `memit` or `alphaedit`.
    public var method = EditorMethod.memit
    /// The MLP output projections edited (`c_proj`, `down_proj`), in block order. The residual stream
    /// after the last one's block is where each edit's target value is sought.
    public var modules: [String] = []
    /// The model folder the statistics were computed on (its name) and the SHA-256 of its weights.
    public var baseModel: String?
    public var baseModelSHA256: String?
    /// Context prefixes: "" (the plain prompt) first, then short texts the model wrote itself. Values are
    /// sought, and keys averaged, over every prefix so an edit holds in other contexts (MEMIT's templates).
    public var prefixes: [String] = [""]
    /// Value search: Adam steps and learning rate on the residual shift δ at the subject's last token.
    public var valueSteps = 20
    public var valueLR: Float = 0.5
    /// Value search: weight of ‖δ‖ / ‖h‖² (keeps the shift small).
    public var valueWeightDecay: Float = 0.5
    /// Value search: ‖δ‖ is clamped to this multiple of ‖h‖ after each step.
    public var clampNormFactor: Float = 0.75
    /// Value search: weight of the KL between the edited and unedited next-token distributions after
    /// "<subject> is a" (keeps the subject's other properties).
    public var klFactor: Float = 0.0625
    /// Value search: an edit stops early once its loss is below this.
    public var valueStopLoss: Float = 0.05
    /// MEMIT: the weight λ of the preserved keys' second moment against the edits' own keys,
    /// `ΔW = (λ·C + KᵀK)⁻¹ KᵀR`: how many preserved keys one edit's key is weighed against. MEMIT's 15,000–
    /// 20,000 are for batches of thousands of edits; for edits a few at a time 10 was the best of 1, 10 and
    /// 100 on the sample model's meta-training edits (README).
    public var covarianceWeight: Float = 10
    /// MEMIT: also hold the earlier edits' keys still, `ΔW = (λ·C + K_pᵀK_p + KᵀK)⁻¹ KᵀR` (AlphaEdit always
    /// does). Off by default: published sequential MEMIT keeps no memory of earlier edits.
    public var keepEditKeys = false
    /// MEMIT: instead of adding each call's update to ΔW, solve for ΔW over every edit so far, `ΔW = (λ·C +
    /// Σ kkᵀ)⁻¹ Σ k·r₀ᵀ`, each edit's key k and the change r₀ it asks of the unedited module kept in the state
    /// (`edit_keys`, `edit_values`): the least-squares accumulation of the DAFNet editor, on MEMIT's keys and
    /// values. Not the published method (off by default); measured as an ablation in the README.
    public var jointSolve = false
    /// AlphaEdit: the weight of ‖ΔW‖² in the projected normal equations, as a fraction of a preserved key's
    /// mean squared norm E‖k‖² = tr C, so it means the same for keys of any width and scale (the paper's
    /// absolute L2 = 10 is for GPT-2 XL and Llama 3 keys). 2e-3 is 0.1 on the sample model's keys
    /// (tr C ≈ 52), the best of 0.01, 0.1 and 1 there on meta-training edits (README).
    public var l2: Float = 2e-3
    /// AlphaEdit: the null space is spanned by the eigenvectors of the key second moment C whose eigenvalues
    /// are below this fraction of the largest. The paper thresholds eigenvalues at an absolute 2e-2 (GPT-2 XL,
    /// Llama 3); a fraction of the largest carries over between models whose activations have other scales.
    /// In wide MLPs the null space holds almost none of the preserved keys' energy; in the sample model's
    /// flat spectrum it holds 4–19 % (`editor create` prints it), and a smaller null space (1 % or 5 % of the
    /// energy) forced larger updates and did worse on meta-training edits (README).
    public var nullspaceThreshold: Float = 1e-2
    /// The statistics pass: tokens seen, and where the text came from.
    public var statisticsTokens = 0
    public var statisticsText: String?

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case method, modules, baseModel = "base_model", baseModelSHA256 = "base_model_sha256", prefixes
        case valueSteps = "value_steps", valueLR = "value_lr", valueWeightDecay = "value_weight_decay"
        case clampNormFactor = "clamp_norm_factor", klFactor = "kl_factor", valueStopLoss = "value_stop_loss"
        case covarianceWeight = "covariance_weight", keepEditKeys = "keep_edit_keys", jointSolve = "joint_solve", l2, nullspaceThreshold = "nullspace_threshold"
        case statisticsTokens = "statistics_tokens", statisticsText = "statistics_text"
    }

    /// The MLP output projections of the blocks edited by default: from 12 % to 25 % of the depth (rounded),
    /// never the last block (no later layer would carry the value to the answer). The published settings
    /// sit there: blocks 3–8 of GPT-J's 28 (MEMIT), 4–8 of Llama's 32 (MEMIT, AlphaEdit); on the 4-block
    /// sample model that is blocks 0 and 1, which beat blocks 1–2 and 0–2 on meta-training edits (README).
    public static func defaultModules(for spec: TransformerSpec) -> [String] {
        let L = spec.layers
        let first = min(Int((0.12 * Double(L)).rounded()), max(0, L - 2))
        let last = min(max(first, Int((0.25 * Double(L)).rounded())), max(0, L - 2))
        return (first...last).map { spec.names.layerPrefix($0) + "." + spec.names.mlpOut }
    }
}

/// MEMIT's and AlphaEdit's edit state: per module the accumulated ΔW, and for AlphaEdit the second
/// moment Σ kkᵀ of every earlier edit's keys (`edit_keys.<module>`), which later edits must not disturb.
public final class MEMITState: EditorState, @unchecked Sendable {
    public private(set) var editCount = 0
    public var deltaWeights: [String: Tensor] = [:]
    public var editKeys: [String: Tensor] = [:]
    /// MEMIT with `joint_solve`: Σ k·r₀ᵀ [in, out] over every edit so far.
    public var editValues: [String: Tensor] = [:]
    let moduleNames: Set<String>

    init(moduleNames: [String]) { self.moduleNames = Set(moduleNames) }

    convenience init(moduleNames: [String], tensors: [String: Tensor], method: EditorMethod, keepsKeys: Bool) throws {
        self.init(moduleNames: moduleNames)
        for (key, t) in tensors {
            if key == "edit_count" { editCount = Int(t[0]); continue }
            let parts = key.split(separator: ".", maxSplits: 1).map(String.init)
            guard parts.count == 2, self.moduleNames.contains(parts[1]) else {
                throw EditingError.foreignState(method: method, reason: "unexpected tensor \"\(key)\" in the edit state")
            }
            switch parts[0] {
            case "delta_weight": deltaWeights[parts[1]] = t.copy()
            case "edit_keys" where keepsKeys: editKeys[parts[1]] = t.copy()
            case "edit_values" where keepsKeys: editValues[parts[1]] = t.copy()
            default: throw EditingError.foreignState(method: method, reason: "unexpected tensor \"\(key)\" in the edit state")
            }
        }
    }

    func count(_ n: Int) { editCount += n }

    public func tensors() -> [String: Tensor] {
        var out: [String: Tensor] = ["edit_count": Tensor(shape: [1], values: [Float(editCount)])]
        for (m, w) in deltaWeights { out["delta_weight." + m] = w }
        for (m, k) in editKeys { out["edit_keys." + m] = k }
        for (m, v) in editValues { out["edit_values." + m] = v }
        return out
    }

    public func delta(_ module: String) -> (weight: Tensor?, bias: Tensor?) { (deltaWeights[module], nil) }
}

/// MEMIT (Meng et al., ICLR 2023) and AlphaEdit (Fang et al., ICLR 2025): no trained network. Per batch of
/// edits: (1) a target value for each edit, the residual stream after the last edited block at the
/// subject's last token shifted by a δ found by a few Adam steps on −log p(target_new) (over the context
/// prefixes, with a KL and a norm penalty); (2) for each edited block in order, the keys (the MLP output
/// projection's inputs at that token, averaged over the prefixes) on the model as edited so far, and the
/// residual still missing at the last block, spread evenly over the remaining blocks; (3) the update
/// that writes it: MEMIT's `ΔW = (λ·C + KᵀK)⁻¹ KᵀR`; AlphaEdit's the same asked only within the null
/// space `P = UUᵀ` of the preserved keys, with the earlier edits' keys `K_p` held still:
/// `ΔW = U (Uᵀ(KᵀK + K_pᵀK_p)U + l2·I)⁻¹ UᵀKᵀR` (the official `solve(P(KKᵀ + C_p) + l2·I, P·K·Rᵀ)`, reduced
/// to the null space's coordinates, where it is symmetric positive definite).
public final class MEMITEditor: SequentialEditor, @unchecked Sendable {
    public let config: MEMITConfig
    public let model: TransformerLM
    public let tokenizer: Tokenizer
    /// Per module: E[kkᵀ] of its inputs on ordinary text [in, in].
    public let keyStatistics: [String: Tensor]
    /// AlphaEdit, per module: an orthonormal basis U [in, k] of the preserved keys' null space.
    public let nullSpaces: [String: Tensor]
    /// Per module: tr C = E‖k‖², the scale `l2` is relative to.
    let keyTraces: [String: Double]
    /// The block of each edited module, and the block whose output holds the target values.
    let blocks: [Int]
    var valueBlock: Int { blocks.last! }
    /// Sequences per forward in the value search and the key pass.
    public var chunkSize = 64

    public var method: EditorMethod { config.method }
    public var moduleNames: [String] { config.modules }
    /// Whether the state keeps the earlier edits' keys (AlphaEdit; MEMIT with `keep_edit_keys` or `joint_solve`).
    var keepsEditKeys: Bool { config.method == .alphaedit || config.keepEditKeys || config.jointSolve }

    public init(config: MEMITConfig, model: TransformerLM, tokenizer: Tokenizer, keyStatistics: [String: Tensor],
                nullSpaces: [String: Tensor] = [:], file: String = EditorRegistry.configFile) throws {
        guard [.memit, .alphaedit].contains(config.method) else {
            throw EditingError.invalidConfig(file: file, field: "method", reason: "\"\(config.method.rawValue)\" is not memit or alphaedit")
        }
        guard !config.modules.isEmpty else { throw EditingError.invalidConfig(file: file, field: "modules", reason: "empty") }
        guard config.prefixes.first == "" else {
            throw EditingError.invalidConfig(file: file, field: "prefixes", reason: "the first prefix must be \"\" (the plain prompt)")
        }
        guard config.valueSteps > 0, config.valueLR > 0, config.clampNormFactor > 0, config.covarianceWeight >= 0, config.l2 > 0 else {
            throw EditingError.invalidConfig(file: file, field: "value_steps/value_lr/clamp_norm_factor/covariance_weight/l2", reason: "must be positive")
        }
        let spec = model.spec
        var blocks: [Int] = []
        for m in config.modules {
            guard let l = (0..<spec.layers).first(where: { spec.names.layerPrefix($0) + "." + spec.names.mlpOut == m }) else {
                throw EditingError.invalidConfig(file: file, field: "modules",
                                                 reason: "\"\(m)\" is not an MLP output projection of this model (\(spec.names.layerPrefix(0)).\(spec.names.mlpOut) and the like)")
            }
            blocks.append(l)
        }
        guard blocks.last! < spec.layers - 1 else {
            throw EditingError.invalidConfig(file: file, field: "modules",
                                             reason: "the last block (\(spec.layers - 1)) cannot be edited: no later layer carries a value at the subject's token to the answer")
        }
        guard blocks == blocks.sorted(), Set(blocks).count == blocks.count else {
            throw EditingError.invalidConfig(file: file, field: "modules", reason: "list each block once, in block order")
        }
        for m in config.modules {
            let n = model.linears[m]!.inFeatures
            guard let s = keyStatistics[m], s.shape == [n, n] else {
                throw EditingError.invalidInput("\(m): key statistics [\(n), \(n)] missing")
            }
            if config.method == .alphaedit {
                guard let u = nullSpaces[m], u.shape.count == 2, u.shape[0] == n else {
                    throw EditingError.invalidInput("\(m): AlphaEdit needs a null-space basis [\(n), k]")
                }
            }
        }
        self.config = config; self.model = model; self.tokenizer = tokenizer
        self.keyStatistics = keyStatistics; self.nullSpaces = nullSpaces; self.blocks = blocks
        keyTraces = keyStatistics.mapValues { c in (0..<c.shape[0]).reduce(0.0) { $0 + Double(c.data[$1 * c.shape[0] + $1]) } }
    }

    // MARK: Creation

    /// Computes the key statistics of `modules` over `texts` (and, for AlphaEdit, their null spaces) and
    /// the context prefixes: an editor for `model` without any training.
    public static func create(method: EditorMethod, model: TransformerLM, tokenizer: Tokenizer, modules: [String]? = nil,
                              texts: [String], settings: MEMITConfig = MEMITConfig(),
                              progress: (Int, Int) -> Void = { _, _ in }) throws -> MEMITEditor {
        var config = settings
        config.method = method
        config.modules = modules ?? MEMITConfig.defaultModules(for: model.spec)
        for m in config.modules where model.linears[m] == nil {
            throw EditingError.editorDoesNotFit(editor: "(new)", madeFor: nil, module: m, modelLinears: model.linearModuleNames)
        }
        if config.prefixes == [""] { config.prefixes = try contextPrefixes(model: model, tokenizer: tokenizer) }
        let (stats, tokens) = LeastSquares.keyStatistics(model: model, tokenizer: tokenizer, modules: config.modules,
                                                          texts: texts, progress: progress)
        guard tokens > 0 else { throw EditingError.invalidInput("the statistics text has no tokens") }
        config.statisticsTokens = tokens
        var spaces: [String: Tensor] = [:]
        if method == .alphaedit {
            for m in config.modules { spaces[m] = try nullSpace(of: stats[m]!, threshold: config.nullspaceThreshold) }
        }
        return try MEMITEditor(config: config, model: model, tokenizer: tokenizer, keyStatistics: stats, nullSpaces: spaces)
    }

    /// An orthonormal basis [n, k] of the eigenvectors of `stats` whose eigenvalues are below `threshold` of
    /// the largest.
    public static func nullSpace(of stats: Tensor, threshold: Float) throws -> Tensor {
        let n = stats.shape[0]
        let a = (0..<(n * n)).map { Double(stats.data[$0]) }
        let (values, vectors) = try LinearAlgebra.symmetricEigen(a, n: n)
        let top = values.last ?? 0
        let keep = values.indices.filter { values[$0] < Double(threshold) * top }
        let u = Tensor(shape: [n, keep.count])
        for i in 0..<n { for (j, c) in keep.enumerated() { u.data[i * keep.count + j] = Float(vectors[i * n + c]) } }
        return u
    }

    /// AlphaEdit: the share of the preserved keys' energy E‖k‖² = tr C in a module's null space, tr(UᵀCU) / tr C.
    public func nullSpaceEnergy(_ m: String) -> Double {
        guard let U = nullSpaces[m], let C = keyStatistics[m], let trace = keyTraces[m], trace > 0 else { return 0 }
        let n = U.shape[0], k = U.shape[1]
        let CU = Tensor(shape: [n, k])
        BLAS.gemm(CU.data, C.data, U.data, M: n, N: k, K: n)
        var s = 0.0
        for i in 0..<(n * k) { s += Double(U.data[i]) * Double(CU.data[i]) }
        return s / trace
    }

    /// MEMIT's context prefixes: "" and, for each of five opening words, the model's greedy continuation
    /// of 10 tokens followed by ". " (the official code samples them; greedy keeps the editor reproducible).
    public static func contextPrefixes(model: TransformerLM, tokenizer: Tokenizer, length: Int = 10) throws -> [String] {
        var out = [""]
        try model.withoutEdits {
            for word in ["The", "Therefore", "Because", "I", "You"] {
                let ids = tokenizer.encode(word)
                let gen = try model.generateGreedy(prompt: ids, maxNewTokens: length, stop: tokenizer.eosTokenID)
                let text = tokenizer.decode(gen).replacingOccurrences(of: "\n", with: " ")
                    .replacingOccurrences(of: "{", with: " ").replacingOccurrences(of: "}", with: " ")
                out.append(text + ". ")
            }
        }
        return out
    }

    // MARK: Persistence

    /// Writes `editor.json` and `editor.safetensors` (`key_stats.<module>`, and `null_space.<module>` for AlphaEdit).
    public func save(to folder: URL) throws {
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        var w = SafetensorsWriter(metadata: ["format": "dafnet-editor", "method": config.method.rawValue])
        try LeastSquares.writeKeyStatistics(keyStatistics, to: &w)
        for m in nullSpaces.keys.sorted() { try w.add("null_space." + m, nullSpaces[m]!) }
        try w.write(to: folder.appendingPathComponent(EditorRegistry.weightsFile))
        try EditorRegistry.writeConfig(config, to: folder)
    }

    public static func load(from folder: URL, model: TransformerLM, tokenizer: Tokenizer) throws -> MEMITEditor {
        let config = try EditorRegistry.readConfig(MEMITConfig.self, from: folder)
        let cfgURL = folder.appendingPathComponent(EditorRegistry.configFile)
        let wURL = folder.appendingPathComponent(EditorRegistry.weightsFile)
        let f = try SafetensorsFile(contentsOf: wURL)
        let stats = try LeastSquares.readKeyStatistics(f, modules: config.modules)
        var spaces: [String: Tensor] = [:]
        if config.method == .alphaedit { for m in config.modules { spaces[m] = try f.tensor("null_space." + m) } }
        return try MEMITEditor(config: config, model: model, tokenizer: tokenizer, keyStatistics: stats, nullSpaces: spaces, file: cfgURL.path)
    }

    // MARK: State

    public func newState() -> EditorState { MEMITState(moduleNames: config.modules) }

    public func restoreState(_ tensors: [String: Tensor]) throws -> EditorState {
        let s = try MEMITState(moduleNames: config.modules, tensors: tensors, method: config.method, keepsKeys: keepsEditKeys)
        for m in config.modules {
            let lin = model.linears[m]!
            if let w = s.deltaWeights[m], w.shape != [lin.inFeatures, lin.outFeatures] {
                throw EditingError.shapeMismatch(name: "delta_weight." + m, expected: [lin.inFeatures, lin.outFeatures], found: w.shape, file: "edit state")
            }
            if let k = s.editKeys[m], k.shape != [lin.inFeatures, lin.inFeatures] {
                throw EditingError.shapeMismatch(name: "edit_keys." + m, expected: [lin.inFeatures, lin.inFeatures], found: k.shape, file: "edit state")
            }
            if let v = s.editValues[m], v.shape != [lin.inFeatures, lin.outFeatures] {
                throw EditingError.shapeMismatch(name: "edit_values." + m, expected: [lin.inFeatures, lin.outFeatures], found: v.shape, file: "edit state")
            }
        }
        return s
    }

    // MARK: Editing

    /// Where an edit's key and value sit: a prompt (with one of the prefixes) and the position of the
    /// subject's last token in it (the prompt's last token when the subject is not given or not in it).
    struct Lookup {
        var item: ScoredPrompt
        var position: Int
    }

    func lookup(_ r: EditRequest, prefix: String) -> Lookup {
        let item = ScoredPrompt(prompt: prefix + r.prompt, target: r.targetNew, tokenizer: tokenizer)
        let subject = subjectTokens(r, prefix: prefix, promptTokens: item.promptIds.count)
        return Lookup(item: item, position: (subject?.upperBound ?? item.promptIds.count) - 1)
    }

    @discardableResult
    public func apply(_ requests: [EditRequest], to anyState: EditorState) throws -> EditTimings {
        let state = try own(anyState, as: MEMITState.self)
        var times = EditTimings()
        guard !requests.isEmpty else { return times }
        var t0 = Date()
        let lookups = requests.map { r in config.prefixes.map { lookup(r, prefix: $0) } }
        for (i, lks) in lookups.enumerated() {
            guard lks.allSatisfy({ !$0.item.targetIds.isEmpty && $0.item.promptIds.count + $0.item.targetIds.count <= model.spec.maxPositions }) else {
                throw EditingError.invalidInput("edit \(i): prompt + target (+ a context prefix) must have 1…\(model.spec.maxPositions) tokens")
            }
        }
        install(state)
        defer { install(state) }
        let kl: [Lookup?] = requests.map { r in
            guard let s = r.subject, !s.isEmpty else { return nil }
            let ids = tokenizer.encode(s + " is a")
            return Lookup(item: ScoredPrompt(promptIds: ids, targetIds: []), position: max(tokenizer.encode(s).count - 1, 0))
        }
        let targets = try searchValues(lookups: lookups, kl: kl)
        times.signal = Date().timeIntervalSince(t0)

        for (i, m) in config.modules.enumerated() {
            t0 = Date()
            let (keys, current) = keysAndValues(lookups: lookups, modules: [m])
            times.auxiliary += Date().timeIntervalSince(t0)
            t0 = Date()
            // R: what the last block still lacks, spread evenly over this block and the ones after it.
            let K = keys[m]!
            let R = targets.copy()
            R.add(current, alpha: -1)
            R.scale(1 / Float(config.modules.count - i))
            if config.method == .memit && config.jointSolve {
                // The change each key asks of the unedited module: this call's residual plus what ΔW gives it now.
                if let w = state.deltaWeights[m] {
                    BLAS.gemm(R.data, K.data, w.data, M: K.shape[0], N: R.shape[1], K: K.shape[1], beta: 1)
                }
                state.editKeys[m] = LeastSquares.gram(K, into: state.editKeys[m])
                state.editValues[m] = LeastSquares.cross(K, R, into: state.editValues[m])
                state.deltaWeights[m] = try memitFactor(m, gram: state.editKeys[m]!).solve(state.editValues[m]!)
            } else {
                let update = try solve(m, keys: K, residual: R, state: state)
                if let w = state.deltaWeights[m] { w.add(update, alpha: 1) } else { state.deltaWeights[m] = update }
            }
            model.linears[m]!.deltaWeight = state.deltaWeights[m]
            times.apply += Date().timeIntervalSince(t0)
        }
        if keepsEditKeys && !config.jointSolve {
            // The keys these edits left, on the model as edited, join the ones later edits must keep.
            t0 = Date()
            let (keys, _) = keysAndValues(lookups: lookups, modules: config.modules)
            for m in config.modules { state.editKeys[m] = LeastSquares.gram(keys[m]!, into: state.editKeys[m]) }
            times.auxiliary += Date().timeIntervalSince(t0)
        }
        state.count(requests.count)
        return times
    }

    /// The update of one module for keys K [n, in] and residuals R [n, out].
    func solve(_ m: String, keys K: Tensor, residual R: Tensor, state: MEMITState) throws -> Tensor {
        let KR = LeastSquares.cross(K, R)  // Kᵀ R [in, out]
        switch config.method {
        case .alphaedit:
            let U = nullSpaces[m]!
            let n = U.shape[0], k = U.shape[1], out = R.shape[1]
            guard k > 0 else { return Tensor(shape: [n, out]) }  // nothing is free to change
            let A = LeastSquares.gram(K, into: state.editKeys[m]?.copy())  // KᵀK + K_pᵀK_p [in, in]
            let AU = Tensor(shape: [n, k])
            BLAS.gemm(AU.data, A.data, U.data, M: n, N: k, K: n)
            let M = Tensor(shape: [k, k])
            BLAS.gemm(M.data, U.data, AU.data, M: k, N: k, K: n, transA: true)  // Uᵀ A U
            var a = (0..<(k * k)).map { Double(M.data[$0]) }
            let alpha = Double(config.l2) * keyTraces[m]!
            for j in 0..<k { a[j * k + j] += alpha }
            let rhs = Tensor(shape: [k, out])
            BLAS.gemm(rhs.data, U.data, KR.data, M: k, N: out, K: n, transA: true)  // Uᵀ Kᵀ R
            let y: Tensor
            do { y = try LinearAlgebra.Cholesky(a, n: k).solve(rhs) } catch {
                throw EditingError.invalidInput("module \(m): AlphaEdit system: \(error)")
            }
            let upd = Tensor(shape: [n, out])
            BLAS.gemm(upd.data, U.data, y.data, M: n, N: out, K: k)
            return upd
        default:
            return try memitFactor(m, gram: LeastSquares.gram(K, into: keepsEditKeys ? state.editKeys[m]?.copy() : nil)).solve(KR)
        }
    }

    /// The factor of MEMIT's system `λ·C + gram` for a module.
    func memitFactor(_ m: String, gram: Tensor) throws -> LinearAlgebra.Cholesky {
        do { return try LeastSquares.factor(stats: keyStatistics[m]!, lambda: config.covarianceWeight, gram: gram) } catch {
            throw EditingError.invalidInput("module \(m): MEMIT system: \(error)")
        }
    }

    /// Per module in `modules`: the keys [n, in] (inputs at the lookup position, averaged over the prefixes),
    /// and the residual stream after the value block at the plain prompt's lookup position [n, hidden], on the
    /// model as it stands.
    func keysAndValues(lookups: [[Lookup]], modules: [String]) -> (keys: [String: Tensor], values: Tensor) {
        let n = lookups.count, P = config.prefixes.count, C = model.spec.hidden
        var keys: [String: Tensor] = [:]
        for m in modules { keys[m] = Tensor(shape: [n, model.linears[m]!.inFeatures]) }
        let values = Tensor(shape: [n, C])
        let flat = lookups.flatMap { $0 }
        var start = 0
        while start < flat.count {
            let chunk = Array(flat[start..<min(start + chunkSize, flat.count)])
            let batch = TokenBatch(rightPadded: chunk.map(\.item.promptIds))
            model.forward(batch)
            for (b, lk) in chunk.enumerated() {
                let seq = start + b, edit = seq / P, row = b * batch.T + lk.position
                for m in modules {
                    let inp = model.lastInput(of: m)!, width = inp.shape[1]
                    BLAS.axpy(keys[m]!.data + edit * width, inp.data + row * width, count: width, alpha: 1 / Float(P))
                }
                if seq % P == 0 {
                    (values.data + edit * C).update(from: model.lastBlockOutput(layer: valueBlock)!.data + row * C, count: C)
                }
            }
            start += chunk.count
        }
        return (keys, values)
    }

    /// The target values z [n, hidden]: the value block's output at each edit's lookup position plus the δ
    /// that makes `target_new` likely after the prompt under every prefix.
    func searchValues(lookups: [[Lookup]], kl: [Lookup?]) throws -> Tensor {
        let n = lookups.count, C = model.spec.hidden
        let z = Tensor(shape: [n, C])
        // Edits in groups whose sequences fit one forward.
        let perEdit = config.prefixes.count + 1
        let group = max(1, chunkSize / perEdit)
        var start = 0
        while start < n {
            let ids = Array(start..<min(start + group, n))
            let part = try searchValues(edits: ids.map { lookups[$0] }, kl: ids.map { kl[$0] })
            for (j, e) in ids.enumerated() { (z.data + e * C).update(from: part.data + j * C, count: C) }
            start += ids.count
        }
        return z
    }

    func searchValues(edits: [[Lookup]], kl: [Lookup?]) throws -> Tensor {
        let n = edits.count, C = model.spec.hidden, V = model.spec.vocabSize
        let module = config.modules.last!
        let lin = model.linears[module]!
        // Sequences: each edit's prompt under every prefix with the target (teacher-forced), then its KL prompt.
        var seqs: [[Int]] = [], owner: [Int] = [], position: [Int] = [], items: [ScoredPrompt?] = []
        var klSeq: [Int?] = Array(repeating: nil, count: n)
        for (e, lks) in edits.enumerated() {
            for lk in lks {
                seqs.append(lk.item.promptIds + lk.item.targetIds.dropLast()); owner.append(e); position.append(lk.position)
                items.append(lk.item)
            }
            if let k = kl[e] {
                klSeq[e] = seqs.count
                seqs.append(k.item.promptIds); owner.append(e); position.append(k.position); items.append(nil)
            }
        }
        let batch = TokenBatch(rightPadded: seqs)
        let N = batch.B * batch.T
        // Labels on the target tokens, each weighted 1 / (target length · prefixes): an edit's NLL is the
        // mean over its prefixes of the per-token mean.
        var labels = [Int32](repeating: -1, count: N)
        var mask = [Float](repeating: 0, count: N)
        for (b, item) in items.enumerated() {
            guard let it = item else { continue }
            let w = 1 / Float(it.targetIds.count * edits[owner[b]].count)
            for (j, token) in it.targetIds.enumerated() {
                let t = it.promptIds.count - 1 + j  // the position that predicts target token j
                labels[b * batch.T + t] = Int32(token)
                mask[b * batch.T + t] = w
            }
        }
        let rows = seqs.indices.map { $0 * batch.T + position[$0] }
        let klRows = klSeq.compactMap { $0 }.map { rows[$0] }
        let klOwner = klSeq.enumerated().compactMap { $0.element == nil ? nil : $0.offset }

        // The unedited values h and KL references (the model as edited so far, no δ).
        lin.outputOffsets = nil
        defer { lin.outputOffsets = nil }
        var logits = model.forward(batch)
        let h = Tensor(shape: [n, C])
        let out = model.lastBlockOutput(layer: valueBlock)!
        for (b, e) in owner.enumerated() where b == owner.firstIndex(of: e) {
            (h.data + e * C).update(from: out.data + rows[b] * C, count: C)
        }
        let klRef = Tensor(shape: [klRows.count, V])
        for (i, r) in klRows.enumerated() { (klRef.data + i * V).update(from: logits.data + r * V, count: V) }
        func rowNorm(_ p: UnsafePointer<Float>) -> Float { Float(Kernels.sumOfSquares(p, count: C).squareRoot()) }
        let hNorm = (0..<n).map { rowNorm(h.data + $0 * C) }

        // Adam on δ [n, C], per edit (an edit stops once its loss is small; the others go on).
        let delta = Tensor(shape: [n, C]), m1 = Tensor(shape: [n, C]), m2 = Tensor(shape: [n, C])
        var steps = [Int](repeating: 0, count: n), active = [Bool](repeating: true, count: n)
        let b1: Float = 0.9, b2: Float = 0.999, eps: Float = 1e-8
        let offsets = Tensor(shape: [rows.count, C])
        let losses = Tensor(shape: [N])
        let klLogits = Tensor(shape: [klRows.count, V]), dKL = Tensor(shape: [klRows.count, V]), klRow = Tensor(shape: [klRows.count])
        for step in 0..<config.valueSteps {
            for (b, e) in owner.enumerated() { (offsets.data + b * C).update(from: delta.data + e * C, count: C) }
            lin.outputOffsets = (rows, offsets)
            logits = model.forward(batch)
            let dlogits = Tensor(shape: [N, V])
            Kernels.crossEntropy(losses: losses.data, dlogits: dlogits.data, logits: logits.data, labels: labels, mask: mask, N: N, V: V)
            for (i, r) in klRows.enumerated() { (klLogits.data + i * V).update(from: logits.data + r * V, count: V) }
            dKL.zero()
            if !klRows.isEmpty {
                Kernels.klDivergence(rows: klRow.data, dlogits: dKL.data, logits: klLogits.data, refLogits: klRef.data, mask: nil,
                                     N: klRows.count, V: V, gradScale: config.klFactor)
                for (i, r) in klRows.enumerated() { BLAS.axpy(dlogits.data + r * V, dKL.data + i * V, count: V, alpha: 1) }
            }
            // Per-edit loss: NLL (mean over prefixes of the per-token mean), KL, norm penalty.
            var loss = [Float](repeating: 0, count: n)
            for (b, e) in owner.enumerated() { for t in 0..<batch.T { loss[e] += losses.data[b * batch.T + t] } }
            for (i, e) in klOwner.enumerated() { loss[e] += config.klFactor * klRow.data[i] }
            for e in 0..<n {
                let dn = rowNorm(delta.data + e * C)
                loss[e] += config.valueWeightDecay * dn / max(hNorm[e] * hNorm[e], 1e-12)
                if loss[e] < config.valueStopLoss { active[e] = false }
            }
            if step == config.valueSteps - 1 || !active.contains(true) { break }
            let caps = model.backward(dlogits: dlogits, parameterGradients: false, capture: [module])
            let dout = caps[module]!.delta
            let grad = Tensor(shape: [n, C])
            for (b, e) in owner.enumerated() { BLAS.axpy(grad.data + e * C, dout.data + rows[b] * C, count: C, alpha: 1) }
            for e in 0..<n where active[e] {
                let d = delta.data + e * C, g = grad.data + e * C
                let dn = rowNorm(d)
                if dn > 0 { BLAS.axpy(g, d, count: C, alpha: config.valueWeightDecay / (dn * max(hNorm[e] * hNorm[e], 1e-12))) }
                steps[e] += 1
                let c1 = 1 - powf(b1, Float(steps[e])), c2 = 1 - powf(b2, Float(steps[e]))
                let mm = m1.data + e * C, vv = m2.data + e * C
                for j in 0..<C {
                    mm[j] = b1 * mm[j] + (1 - b1) * g[j]
                    vv[j] = b2 * vv[j] + (1 - b2) * g[j] * g[j]
                    d[j] -= config.valueLR * (mm[j] / c1) / (sqrtf(vv[j] / c2) + eps)
                }
                let maxNorm = config.clampNormFactor * hNorm[e]
                let after = rowNorm(d)
                if after > maxNorm { for j in 0..<C { d[j] *= maxNorm / after } }
            }
        }
        h.add(delta, alpha: 1)
        return h
    }
}
