import Foundation
import LanguageModel
import Storage
import TensorCore
import Tokenizers

/// How an editor folds each edit's update into the accumulated ΔW of a module.
public enum Accumulation: String, Codable, Sendable, CaseIterable {
    /// The paper's rule: `ΔW ← s_past·ΔW + lr·Σᵢ sᵢ·x1ᵢᵀx2ᵢ`, the decay and the scales from the (detached)
    /// score attention. The weights form a convex combination, so over N edits each weighs about 1/N.
    case decayed
    /// Least squares over every edit so far (the normal equations MEMIT solves and MALMEN uses to merge a
    /// hyper-network's shifts): the network's value rows `lr·x2` are asked of the module at the edits'
    /// own input rows `u`, while the preserved inputs' second moment `C` (from ordinary text) holds the
    /// output still: `ΔW = (λ·C + Σ uuᵀ)⁻¹ Σ u·(lr·x2)ᵀ`, λ learned per module. No edit is diluted by
    /// later ones; the sums are order-independent and exact for any N.
    case leastSquares = "least_squares"
}

/// Which positions of an edit's sequence give gradient-signal rows.
public enum SignalRows: String, Codable, Sendable, CaseIterable {
    /// Every position where the module's input and output gradient are both non-zero (the paper's).
    case all
    /// Only the positions that predict target tokens (the prompt's last token onwards): a few rows per edit
    /// instead of the whole prompt, so a long sequence asks fewer things of each module.
    case answer
    /// The subject's tokens in the prompt (where ROME and MEMIT place an edit: the relation's words, which
    /// an edit shares with its neighbours, give no rows). The prompt's last token when the edit names no
    /// subject or its prompt does not contain it.
    case subject
    /// The subject's last token only (MEMIT's key), with the same fallback.
    case subjectLast = "subject_last"
}

/// The editor's committed configuration (`editor.json`): the edited modules, the auxiliary network's
/// sizes, the method, and the meta-training settings.
public struct EditorConfig: Codable, Sendable {
    /// `dafnet` (inter-edit fusion) or `mend` (the same per-token network, plain accumulation).
    public var method = EditorMethod.dafnet
    /// HF names of the edited linear modules.
    public var modules: [String] = []
    /// The model folder the editor was trained for (its name; named in the error when it does not fit another).
    public var baseModel: String?
    public var editBias = true
    public var auxModel = AuxNetConfig()
    /// Initial per-module edit learning rate (learned during meta-training).
    public var initEditLR: Float = 1e-3
    /// How updates accumulate over a sequence (`decayed`: the paper's; see `Accumulation`).
    public var accumulation = Accumulation.decayed
    /// Initial λ of `least_squares`, the weight of the preserved inputs' second moment (learned per module).
    public var lsLambda: Float = 1
    /// A constant factor on every module's learned λ (1: as learned). Routed edits touch only their subjects'
    /// inputs, so less of the preserved inputs' weight keeps the rest still.
    public var lsLambdaScale: Float = 1
    /// Which positions give signal rows (`all`: the paper's).
    public var signalRows = SignalRows.all
    /// `least_squares`: how many other subjects each edit's prompt is also asked with, their keys held still
    /// in the solve (0: none). See `DAFNetEditor.contrastRows`.
    public var contrastSubjects = 0
    /// The weight of a contrast prompt's rows against the edit's own (both enter `Σ uuᵀ`).
    public var contrastWeight: Float = 1
    /// When set, the edits apply only where an input comes within this cosine of an edit's key (see
    /// `EditRouter`); nil applies them to every input, as the paper does.
    public var routeThreshold: Float?
    /// `least_squares` with `route_threshold`: every this many edits, the sums so far are solved once more,
    /// that ΔW is frozen as a shard and the sums start again empty; a routed input sees the shard of the
    /// closest edit key it matched (as WISE's side memories), so that no solve holds more than this many
    /// edits. nil: one shard for every edit. Inference only (meta-training episodes are one shard).
    public var lsShardEdits: Int?
    public var training = MetaTrainingConfig()

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case method, modules, baseModel = "base_model", editBias = "edit_bias", auxModel = "aux_model", initEditLR = "init_edit_lr"
        case accumulation, lsLambda = "ls_lambda", lsLambdaScale = "ls_lambda_scale", signalRows = "signal_rows", contrastSubjects = "contrast_subjects"
        case contrastWeight = "contrast_weight", routeThreshold = "route_threshold", lsShardEdits = "ls_shard_edits", training
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

/// How the longest sequence of a meta-training episode grows.
public enum Curriculum: String, Codable, Sendable, CaseIterable {
    /// By `grow_by` every `grow_every` steps.
    case linear
    /// The official recipe's: by max(25 %, 10) when the moving average of the reliability loss has made
    /// no new minimum for `plateau_patience / max(1, log10 n)` steps.
    case plateau
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
    /// The curriculum: episodes draw their length uniformly from 1…n, n starting at 1 and growing to `maxSeq`.
    public var curriculum = Curriculum.linear
    public var maxSeq = 8
    /// `plateau`: the longest sequence at step 0 (1 from scratch; larger when continuing from a trained
    /// editor with `--init-from`, whose networks already handle short sequences).
    public var curriculumStart = 1
    public var growEvery = 200
    public var growBy = 1
    /// `plateau`: steps without a new minimum of the moving-average reliability loss before n grows (at n ≤ 10).
    public var plateauPatience = 3000
    /// `plateau`: the moving average's weight on the past (0.99: about the last 100 steps).
    public var plateauDecay = 0.99
    /// Losses are taken on at most this many of an episode's edits (with their rephrasings and locality
    /// prompts), drawn at random; 0 takes them all. The official recipe samples 48–64.
    public var lossSample = 0
    /// Episodes a step (the global batch; their gradients averaged). Under MPI they are dealt out to the
    /// ranks, so it must be at least the number of processes.
    public var episodesPerStep = 1
    /// Adam's learning rate for the learned log λ of `least_squares`.
    public var lsLambdaLR: Float = 1e-2
    public var gradClip: Float = 100
    public var checkpointEvery = 100
    public var logEvery = 10

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case steps, seed, auxLR = "aux_lr", editLRLR = "edit_lr_lr", reliaLambda = "relia_lambda", genLambda = "gen_lambda"
        case locLambda = "loc_lambda", curriculum, maxSeq = "max_seq", curriculumStart = "curriculum_start", growEvery = "grow_every", growBy = "grow_by"
        case plateauPatience = "plateau_patience", plateauDecay = "plateau_decay", lossSample = "loss_sample"
        case episodesPerStep = "episodes_per_step"
        case lsLambdaLR = "ls_lambda_lr", gradClip = "grad_clip", checkpointEvery = "checkpoint_every", logEvery = "log_every"
    }
}

/// The names of a sharded state's frozen ΔW, `shard_delta.<shard>.<module>`: written and read by `EditState`,
/// read by `EditedModelExport` (which installs a state without its editor).
public enum ShardTensors {
    static let prefix = "shard_delta."

    static func name(shard: Int, module: String) -> String { prefix + "\(shard)." + module }

    /// Per module named in `tensors`, its frozen shards in shard order; an error naming a malformed name, or
    /// a module whose shards are not numbered 0…n−1.
    static func frozen(in tensors: [String: Tensor]) throws -> [String: [Tensor]] {
        var byModule: [String: [Int: Tensor]] = [:]
        for (name, t) in tensors where name.hasPrefix(prefix) {
            let rest = name.dropFirst(prefix.count).split(separator: ".", maxSplits: 1).map(String.init)
            guard rest.count == 2, let i = Int(rest[0]), i >= 0 else { throw EditingError.invalidInput("edit state: bad shard name \"\(name)\"") }
            byModule[rest[1], default: [:]][i] = t
        }
        var out: [String: [Tensor]] = [:]
        for (module, shards) in byModule {
            guard shards.keys.sorted() == Array(0..<shards.count) else {
                throw EditingError.invalidInput("edit state: the frozen shards of \(module) are not numbered 0…\(shards.count - 1)")
            }
            out[module] = (0..<shards.count).map { shards[$0]! }
        }
        return out
    }
}

/// Everything needed to continue a sequence of edits exactly: per module ΔW, Δb and the auxiliary
/// network's past — the fusion attention's projections of each past edit's sample representation (keys,
/// values and score keys, one row per edit per layer: all the network reads of the past) —, the
/// `least_squares` sums, and the edit count. Memory grows by `layer_n × (2·outer_att_dim·heads +
/// outer_score_att_dim·heads)` floats per edit per module.
public final class EditState: EditorState, @unchecked Sendable {
    public final class Module {
        public var deltaWeight: Tensor?
        public var deltaBias: Tensor?
        /// The fusion attention's memo of the past (nil before the first edit, and for MEND).
        public var past: PastProjections?
        /// A state stored before the projections were: its past's representations, turned into `past` by
        /// the editor that restores it (`DAFNetEditor.restoreState`).
        var legacyReps: [Tensor] = []
        /// `least_squares` only: Σ uuᵀ [in, in] over the edits' input rows, and Σ u·vᵀ [in, out] with their values.
        public var gram: Tensor?
        public var cross: Tensor?
        /// `ls_shard_edits`: the ΔW of each frozen shard [in, out], in shard order.
        public var frozen: [Tensor] = []
        init() {}
    }

    public private(set) var modules: [String: Module] = [:]
    public var editCount = 0
    /// `ls_shard_edits`: the edits of each frozen shard, in shard order (each module's `frozen` holds their ΔW).
    public var shardEdits: [Int] = []
    /// The shard size this state folds its edits with (nil: one solve), fixed by its first edit from the
    /// editor's `ls_shard_edits` and kept whatever later editors say, so that its versions replay as they were
    /// made; `shardSizeDecided` once fixed (a restored state is: without a record, it has no shards).
    public var shardSize: Int?
    var shardSizeDecided = false
    /// The edits in the sums, not yet frozen in a shard.
    public var openShardEdits: Int { editCount - shardEdits.reduce(0, +) }
    /// `route_threshold`: the keys of the edits so far and where the model compares them.
    public var router: EditRouter?

    public init(moduleNames: [String]) {
        for m in moduleNames { modules[m] = Module() }
    }

    /// Named tensors for the checkpoint store: `delta_weight.<m>`, `delta_bias.<m>`,
    /// `past.<m>.<layer>.keys|values|score_keys` (`reps.<m>.<layer>` while legacy tensors await their editor),
    /// `gram.<m>` (its upper triangle, row by row, when exactly symmetric), `cross.<m>` and `edit_count`; with
    /// frozen shards `shard_edits` [shards] and `shard_delta.<s>.<m>`.
    public func tensors() -> [String: Tensor] {
        var out: [String: Tensor] = ["edit_count": Tensor(shape: [1], values: [Float(editCount)])]
        if !shardEdits.isEmpty { out[Self.shardEditsName] = Tensor(shape: [shardEdits.count], values: shardEdits.map(Float.init)) }
        if let n = shardSize { out[Self.shardSizeName] = Tensor(shape: [1], values: [Float(n)]) }
        for (name, m) in modules {
            for (i, w) in m.frozen.enumerated() { out[ShardTensors.name(shard: i, module: name)] = w }
            if let w = m.deltaWeight { out["delta_weight." + name] = w }
            if let b = m.deltaBias { out["delta_bias." + name] = b }
            if let p = m.past, p.isComplete {
                for l in p.rows.indices {
                    out["past.\(name).\(l).keys"] = p.keys[l]!
                    out["past.\(name).\(l).values"] = p.values[l]!
                    out["past.\(name).\(l).score_keys"] = p.scoreKeys[l]!
                }
            }
            for (l, r) in m.legacyReps.enumerated() { out["reps.\(name).\(l)"] = r }
            if let g = m.gram { out["gram." + name] = LeastSquares.packedUpper(g) ?? g }
            if let c = m.cross { out["cross." + name] = c }
        }
        if let router { out.merge(RouteTensors.tensors(of: router)) { a, _ in a } }
        return out
    }

    static let shardEditsName = "shard_edits"
    static let shardSizeName = "shard_size"

    /// The shard size `tensors` record (nil: none), or an error when it is not one whole number ≥ 1.
    static func recordedShardSize(in tensors: [String: Tensor]) throws -> Int? {
        guard let t = tensors[shardSizeName] else { return nil }
        guard t.count == 1, t[0] >= 1, t[0] == t[0].rounded(), t[0] < 16_777_216 else {
            throw EditingError.invalidInput("edit state: \"\(shardSizeName)\" must be one whole number ≥ 1")
        }
        return Int(t[0])
    }

    /// Rebuilds a state from `tensors()`; names outside `moduleNames` are an error.
    public convenience init(moduleNames: [String], tensors: [String: Tensor]) throws {
        self.init(moduleNames: moduleNames)
        router = try RouteTensors.router(from: tensors)
        shardSize = try Self.recordedShardSize(in: tensors)
        shardSizeDecided = true
        var pastParts: [String: [Int: [String: Tensor]]] = [:]
        let frozen = try ShardTensors.frozen(in: tensors)
        for (key, t) in tensors {
            if key == "edit_count" { editCount = Int(t[0]); continue }
            if key == Self.shardSizeName { continue }   // `recordedShardSize`, above
            if key == Self.shardEditsName {
                guard t.rank == 1, t.array.allSatisfy({ $0 >= 1 && $0 == $0.rounded() }) else {
                    throw EditingError.invalidInput("edit state: \"\(key)\" must list each frozen shard's edit count")
                }
                shardEdits = t.array.map { Int($0) }
                continue
            }
            if RouteTensors.names.contains(key) { continue }
            let parts = key.split(separator: ".", maxSplits: 1).map(String.init)
            guard parts.count == 2 else { throw EditingError.invalidInput("edit state: unexpected tensor \"\(key)\"") }
            switch parts[0] {
            case "delta_weight", "delta_bias", "gram", "cross":
                guard let m = modules[parts[1]] else { throw EditingError.unknownModule(parts[1]) }
                switch parts[0] {
                case "delta_weight": m.deltaWeight = t.copy()
                case "delta_bias": m.deltaBias = t.copy()
                case "gram":
                    guard let g = t.shape.count == 2 ? t.copy() : LeastSquares.unpackedUpper(t) else {
                        throw EditingError.invalidInput("edit state: \"\(key)\" is neither a square matrix nor its upper triangle")
                    }
                    m.gram = g
                default: m.cross = t.copy()
                }
            case "shard_delta":
                continue   // `frozen`, above
            case "reps":
                guard let dot = parts[1].lastIndex(of: "."), let l = Int(parts[1][parts[1].index(after: dot)...]),
                      let m = modules[String(parts[1][..<dot])] else {
                    throw EditingError.invalidInput("edit state: bad representation name \"\(key)\"")
                }
                while m.legacyReps.count <= l { m.legacyReps.append(Tensor(shape: [0, t.shape.last ?? 0])) }
                m.legacyReps[l] = t.copy()
            case "past":
                // past.<module>.<layer>.<keys|values|score_keys>
                let rest = parts[1].split(separator: ".").map(String.init)
                let module = rest.dropLast(2).joined(separator: ".")
                guard rest.count >= 3, let l = Int(rest[rest.count - 2]), ["keys", "values", "score_keys"].contains(rest.last!),
                      modules[module] != nil else {
                    throw EditingError.invalidInput("edit state: bad past projection name \"\(key)\"")
                }
                pastParts[module, default: [:]][l, default: [:]][rest.last!] = t.copy()
            default:
                throw EditingError.invalidInput("edit state: unexpected tensor \"\(key)\"")
            }
        }
        if let stranger = frozen.keys.first(where: { modules[$0] == nil }) {
            throw EditingError.invalidInput("edit state: frozen shards of \"\(stranger)\", which the editor does not edit")
        }
        for name in modules.keys {
            let shards = frozen[name] ?? []
            guard shards.count == shardEdits.count else {
                throw EditingError.invalidInput("edit state: \(name) has \(shards.count) frozen shard(s), \(Self.shardEditsName) lists \(shardEdits.count)")
            }
            modules[name]!.frozen = shards.map { $0.copy() }
        }
        guard shardEdits.reduce(0, +) <= editCount else {
            throw EditingError.invalidInput("edit state: the frozen shards hold more edits than edit_count")
        }
        for (name, layers) in pastParts {
            let n = layers.count
            guard layers.keys.sorted() == Array(0..<n), layers.values.allSatisfy({ $0.count == 3 }),
                  Set(layers.values.map { $0["keys"]!.shape[0] }).count == 1,
                  layers.values.allSatisfy({ Set($0.values.map { $0.shape.first ?? -1 }).count == 1 }) else {
                throw EditingError.invalidInput("edit state: the past projections of \(name) are incomplete or disagree in rows")
            }
            let ordered = (0..<n).map { layers[$0]! }
            modules[name]!.past = PastProjections(keys: ordered.map { $0["keys"]! }, values: ordered.map { $0["values"]! },
                                                  scoreKeys: ordered.map { $0["score_keys"]! })
        }
    }

    public func delta(_ module: String) -> (weight: Tensor?, bias: Tensor?) {
        (modules[module]?.deltaWeight, modules[module]?.deltaBias)
    }

    public func frozenDeltas(_ module: String) -> [Tensor] { modules[module]?.frozen ?? [] }

    /// ΔW, Δb and the least-squares sums: the networks' outputs fold into them and nothing else reads them
    /// back, so replaying the edits rebuilds them.
    public var rebuiltByReplay: Set<String> {
        var names = Set<String>()
        for (name, m) in modules {
            for (prefix, t) in [("delta_weight.", m.deltaWeight), ("delta_bias.", m.deltaBias), ("gram.", m.gram), ("cross.", m.cross)] where t != nil {
                names.insert(prefix + name)
            }
            for i in m.frozen.indices { names.insert(ShardTensors.name(shard: i, module: name)) }
        }
        return names
    }

    /// With `least_squares`, ΔW: the solution of the sums' system, which `replay` solves again from them.
    public var derivedFromRest: Set<String> {
        Set(modules.compactMap { name, m in m.gram != nil && m.cross != nil && m.deltaWeight != nil ? "delta_weight." + name : nil })
    }

    /// Just after a shard was frozen the sums are empty: the whole state is the frozen shards (stored once for
    /// every version that holds them), the networks' past and the router.
    public var wholeCostsLittle: Bool { !shardEdits.isEmpty && openShardEdits == 0 }

    public func copy() -> EditState {
        let s = EditState(moduleNames: Array(modules.keys))
        s.editCount = editCount
        s.shardEdits = shardEdits
        s.shardSize = shardSize
        s.shardSizeDecided = shardSizeDecided
        s.router = router  // immutable: shared
        for (k, m) in modules {
            s.modules[k]!.deltaWeight = m.deltaWeight?.copy()
            s.modules[k]!.deltaBias = m.deltaBias?.copy()
            s.modules[k]!.past = m.past?.copy()
            s.modules[k]!.legacyReps = m.legacyReps.map { $0.copy() }
            s.modules[k]!.gram = m.gram?.copy()
            s.modules[k]!.cross = m.cross?.copy()
            s.modules[k]!.frozen = m.frozen  // never written once frozen: shared
        }
        return s
    }
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
public final class DAFNetEditor: SequentialEditor, @unchecked Sendable {
    public let config: EditorConfig
    public let model: TransformerLM
    public let tokenizer: Tokenizer
    /// One network per module shape, keyed "in×out".
    public let networks: [String: AuxiliaryNetwork]
    /// Per module: its network key and mode.
    public let routing: [String: (key: String, mode: Int)]
    /// Per network key: the modules it serves, in the configuration's order (the i-th has mode i).
    public let modulesOfNetwork: [String: [String]]
    /// Learned per-module edit learning rates, [1] each.
    public let editLRs: [String: Parameter]
    /// `least_squares`: per module the preserved inputs' second moment E[uuᵀ] [in, in] (set by
    /// `setKeyStatistics` or loaded with the editor), and the learned log λ [1].
    public private(set) var keyStatistics: [String: Tensor] = [:]
    public let logLambdas: [String: Parameter]
    /// The subjects contrast prompts draw from (`contrast_subjects`; the folder's `subjects.txt`).
    public var subjects: [String] = []
    /// `route_threshold`: the whitening of the router's site, computed on first use.
    var routeWhiteningCache: Tensor?

    public var fusion: Bool { config.method == .dafnet }
    public var method: EditorMethod { config.method }
    public var moduleNames: [String] { config.modules }

    public init(config: EditorConfig, model: TransformerLM, tokenizer: Tokenizer) throws {
        guard [.dafnet, .mend].contains(config.method) else {
            throw EditingError.invalidConfig(file: "editor.json", field: "method", reason: "\"\(config.method.rawValue)\" is not dafnet or mend")
        }
        guard !config.modules.isEmpty else { throw EditingError.invalidConfig(file: "editor.json", field: "modules", reason: "empty") }
        if [.subject, .subjectLast].contains(config.signalRows) {
            let last = model.spec.names.layerPrefix(model.spec.layers - 1) + "."
            if let m = config.modules.first(where: { $0.hasPrefix(last) }) {
                throw EditingError.invalidConfig(file: "editor.json", field: "modules",
                                                 reason: "\"\(m)\" is in the last block: under signal_rows \(config.signalRows.rawValue) no later layer carries the subject's tokens to the answer")
            }
        }
        if config.lsShardEdits != nil {
            let reason: String? = config.accumulation != .leastSquares ? "needs accumulation least_squares (shards are frozen solves)"
                : config.routeThreshold == nil ? "needs route_threshold (a shard is chosen by the closest edit key)"
                : config.contrastSubjects > 0 ? "cannot be combined with contrast_subjects" : nil
            if let reason { throw EditingError.invalidConfig(file: "editor.json", field: "ls_shard_edits", reason: reason) }
        }
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
        modulesOfNetwork = shapes
        editLRs = Dictionary(uniqueKeysWithValues: config.modules.map {
            ($0, Parameter(name: "edit_lr." + $0, value: Tensor(shape: [1], values: [config.initEditLR]), decay: false))
        })
        logLambdas = config.accumulation == .leastSquares ? Dictionary(uniqueKeysWithValues: config.modules.map {
            ($0, Parameter(name: "ls_log_lambda." + $0, value: Tensor(shape: [1], values: [Foundation.log(config.lsLambda)]), decay: false))
        }) : [:]
    }

    /// Sets the preserved inputs' second moments (one [in, in] per edited module).
    public func setKeyStatistics(_ stats: [String: Tensor]) throws {
        for m in config.modules {
            let n = model.linears[m]!.inFeatures
            guard let t = stats[m], t.shape == [n, n] else {
                throw EditingError.invalidInput("key statistics: module \(m) needs a [\(n), \(n)] second moment")
            }
        }
        keyStatistics = stats
    }

    /// Copies another editor's network weights and batch-norm statistics, and its edit learning rates and
    /// learned λ when it accumulates by the same rule (the rates mean something else under another). The
    /// networks match by module shape: every shape of this editor must have a network of the same size and
    /// as many modules in the other, and the i-th module of a shape takes the other's i-th. So an editor of
    /// other blocks, or of a subset of the other's shapes (only the MLPs' output projections, say), starts
    /// from a trained one.
    public func warmStart(from other: DAFNetEditor) throws {
        guard other.config.auxModel == config.auxModel else {
            throw EditingError.invalidInput("warm start: the editors' network sizes differ")
        }
        for (key, modules) in modulesOfNetwork.sorted(by: { $0.key < $1.key }) where other.modulesOfNetwork[key]?.count != modules.count {
            throw EditingError.invalidInput("warm start: the other editor has no network for \(modules.count) module(s) of shape \(key)")
        }
        for (key, net) in networks {
            let src = other.networks[key]!
            for (p, q) in zip(net.parameters, src.parameters) { p.value.assign(q.value) }
            net.norm = src.norm
            guard other.config.accumulation == config.accumulation else { continue }
            for (m, o) in zip(modulesOfNetwork[key]!, other.modulesOfNetwork[key]!) {
                editLRs[m]!.value.assign(other.editLRs[o]!.value)
                if let p = logLambdas[m], let q = other.logLambdas[o] { p.value.assign(q.value) }
            }
        }
    }

    /// λ of a module under `least_squares`: `ls_lambda_scale` times the learned value.
    public func lambda(_ module: String) -> Float { config.lsLambdaScale * Foundation.exp(logLambdas[module]!.value[0]) }

    /// Every trainable parameter: the networks' and the edit learning rates.
    public var trainableParameters: [Parameter] {
        networks.keys.sorted().flatMap { k in networks[k]!.parameters.map { Parameter(name: "\(k)/" + $0.name, value: $0.value, grad: $0.grad, decay: false) } }
            + config.modules.map { editLRs[$0]! } + config.modules.compactMap { logLambdas[$0] }
    }

    public func initialise(seed: UInt64) {
        var rng = RNG(seed: seed)
        for k in networks.keys.sorted() { networks[k]!.initialise(rng: &rng) }
    }

    // MARK: Sequences

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

    /// The positions of an edit's sequence (prompt + answer without its last token) that give signal rows.
    func signalPositions(_ r: EditRequest, _ item: ScoredPrompt) -> Range<Int> {
        let last = item.promptIds.count - 1
        switch config.signalRows {
        case .all: return 0..<(last + item.targetIds.count)
        case .answer: return last..<(last + item.targetIds.count)
        case .subject, .subjectLast:
            guard let s = subjectTokens(r, promptTokens: item.promptIds.count) else { return last..<(last + 1) }
            return config.signalRows == .subject ? s : (s.upperBound - 1)..<s.upperBound
        }
    }

    /// Signals of the *unedited* model on the edits' loss −Σ mask·log p(target): per module, the rows
    /// `[u | δ]` of the edit's signal positions (`signal_rows`) where both are non-zero, one segment per edit.
    public func signals(_ requests: [EditRequest]) -> [String: ModuleSignals] {
        signals(requests, scored: requests.map { scored($0.prompt, $0.targetNew) })
    }

    /// The same, with the edits already tokenized (`scored`, in order).
    func signals(_ requests: [EditRequest], scored edits: [ScoredPrompt]) -> [String: ModuleSignals] {
        let positions = zip(requests, edits).map { signalPositions($0, $1) }
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
                    for t in positions[b] {
                        let r = b * batch.T + t
                        let u = s.u.data + r * inF, dl = s.delta.data + r * outF
                        var uNZ = false, dNZ = false
                        for i in 0..<inF where u[i] != 0 { uNZ = true; break }
                        for i in 0..<outF where dl[i] != 0 { dNZ = true; break }
                        if uNZ && dNZ { rows.append(r); n += 1 }
                    }
                    lengths.append(n)
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

    public func newState() -> EditorState { EditState(moduleNames: config.modules) }

    /// An empty state whose shard size is the one `tensors` records (none when they record none).
    public func newState(foldingAs tensors: [String: Tensor]) throws -> EditorState {
        let state = EditState(moduleNames: config.modules)
        state.shardSize = try EditState.recordedShardSize(in: tensors)
        state.shardSizeDecided = true
        return state
    }

    public func restoreState(_ tensors: [String: Tensor]) throws -> EditorState {
        let state = try EditState(moduleNames: config.modules, tensors: tensors)
        // A state stored with its past's representations: their projections through this editor's networks.
        for (m, st) in state.modules where !st.legacyReps.isEmpty {
            let net = networks[routing[m]!.key]!
            guard st.legacyReps.count == net.config.layerN, st.legacyReps.allSatisfy({ $0.count % net.dim == 0 }) else {
                throw EditingError.invalidInput("edit state: the past representations of \(m) do not fit its network")
            }
            if fusion { st.past = net.projections(ofPast: st.legacyReps) }
            st.legacyReps = []
        }
        return state
    }

    /// Applies `requests` in order as one call of the networks (each edit attends causally to the earlier
    /// ones and to the state's past), folds the result into `state`, and installs it on the model.
    @discardableResult
    public func apply(_ requests: [EditRequest], to anyState: EditorState) throws -> EditTimings {
        try apply(requests, to: anyState, superseding: [])
    }

    /// With `least_squares`, the superseded edits' rows — their signals and the networks' values for them
    /// given the state's past, recomputed — are taken out of the sums before the new edits' rows go in, so
    /// that a fact edited again holds its new target instead of the mean of both (their router keys stay:
    /// the new edits name the same subjects). The paper's decayed rule has no per-edit term to take out.
    @discardableResult
    public func apply(_ requests: [EditRequest], to anyState: EditorState, superseding superseded: [PriorEdit]) throws -> EditTimings {
        let state = try own(anyState, as: EditState.self)
        guard !requests.isEmpty else { return EditTimings() }
        var times = try fold(requests, into: state, superseding: superseded, solve: true)
        let t0 = Date()
        install(state)
        times.apply += Date().timeIntervalSince(t0)
        return times
    }

    /// Replays as `apply` did, batch by batch; the least-squares system is solved once, after the last batch
    /// (ΔW depends only on the sums, so the result is the same bit for bit), unless `finish` is false.
    public func replay(_ batches: [ReplayBatch], onto anyState: EditorState, finish: Bool) throws {
        let state = try own(anyState, as: EditState.self)
        for b in batches where !b.requests.isEmpty {
            try b.atItsThreadCount { _ = try fold(b.requests, into: state, superseding: b.superseded, solve: false) }
        }
        guard finish else { return }
        // Solved as the last batch's apply solved it, at its thread count.
        if config.accumulation == .leastSquares {
            try (batches.last ?? ReplayBatch(requests: [], superseded: [])).atItsThreadCount {
                for m in config.modules {
                    let st = state.modules[m]!
                    if let g = st.gram, let c = st.cross { st.deltaWeight = try solveLeastSquares(m, gram: g).solve(c) }
                }
            }
        }
        install(state)
    }

    /// `apply` without installing: the edits folded into `state`; `solve: false` leaves a least-squares ΔW
    /// stale (for `replay`).
    @discardableResult
    func fold(_ requests: [EditRequest], into state: EditState, superseding prior: [PriorEdit], solve: Bool) throws -> EditTimings {
        var times = EditTimings()
        var t0 = Date()
        let sig = try checkedSignals(requests)
        let contrast = config.accumulation == .leastSquares ? contrastRows(requests) : [:]
        let size = shardSize(for: state)
        let sharded = size != nil
        let pieces = shardPieces(requests.count, open: state.openShardEdits, size: size)
        var shardOfEdit: [Int32] = []
        for (i, p) in pieces.enumerated() { shardOfEdit += [Int32](repeating: Int32(state.shardEdits.count + i), count: p.edits.count) }
        // With shards, a superseded edit's rows come out of the sums only while its shard is open (a frozen
        // shard keeps them), and its keys are retired either way, so that its subject reaches the new edit.
        let frozenEdits = state.shardEdits.reduce(0, +)
        let superseded = prior.filter { !sharded || $0.ordinal >= frozenEdits }.map(\.request)
        let router = try config.routeThreshold.map {
            try grownRouter(state.router, for: requests, threshold: $0, shards: sharded ? shardOfEdit : nil, editCount: state.editCount,
                            retired: sharded ? Set(prior.map(\.ordinal)) : [])
        }
        let taken = config.accumulation == .leastSquares && !superseded.isEmpty ? try checkedSignals(superseded) : nil
        let takenContrast = taken == nil ? [:] : contrastRows(superseded)
        times.signal = Date().timeIntervalSince(t0)
        t0 = Date()
        // The superseded edits first, against the past as it is (the state's past is not changed by them).
        let takenOutputs = taken.map { networkOutputs($0, state: state, keep: false) }
        let outputs = networkOutputs(sig, state: state, keep: true)
        times.auxiliary = Date().timeIntervalSince(t0)
        t0 = Date()
        for m in config.modules {
            let out = outputs[m]!
            let st = state.modules[m]!
            let lr = editLRs[m]!.value[0]
            switch config.accumulation {
            case .decayed:
                let (dW, db) = out.products(tape: Tape(recording: false))
                let decay = fusion ? out.pastUpdateScale : 1
                st.deltaWeight = Self.accumulate(st.deltaWeight, decay: decay, new: dW.value, lr: lr)
                if config.editBias { st.deltaBias = Self.accumulate(st.deltaBias, decay: decay, new: db.value, lr: lr) }
            case .leastSquares:
                if let taken, let old = takenOutputs?[m], st.gram != nil, st.cross != nil {
                    let u = taken[m]!.x.columnSlice(0..<old.x1.shape[1])
                    st.gram = LeastSquares.gram(u, alpha: -1, into: st.gram)
                    if let c = takenContrast[m] { st.gram = LeastSquares.gram(c, alpha: -1, into: st.gram) }
                    st.cross = LeastSquares.cross(u, old.values.value, alpha: -lr, into: st.cross)
                }
                let u = sig[m]!.x.columnSlice(0..<out.x1.shape[1])
                if pieces.count == 1 && !pieces[0].freezes {
                    st.gram = LeastSquares.gram(u, into: st.gram)
                    if let c = contrast[m] { st.gram = LeastSquares.gram(c, into: st.gram) }
                    st.cross = LeastSquares.cross(u, out.values.value, alpha: lr, into: st.cross)
                } else {
                    // Each piece's rows go into the open sums; a piece that fills its shard is solved and frozen.
                    let starts = sig[m]!.lengths.reduce(into: [0]) { $0.append($0.last! + $1) }
                    for p in pieces {
                        let rows = starts[p.edits.lowerBound]..<starts[p.edits.upperBound]
                        st.gram = LeastSquares.gram(u.rows(rows), into: st.gram)
                        st.cross = LeastSquares.cross(u.rows(rows), out.values.value.rows(rows), alpha: lr, into: st.cross)
                        guard p.freezes else { continue }
                        st.frozen.append(LeastSquares.roundedForStorage(try solveLeastSquares(m, gram: st.gram!).solve(st.cross!)))
                        st.gram = nil; st.cross = nil; st.deltaWeight = nil
                    }
                }
                if solve, let g = st.gram, let c = st.cross { st.deltaWeight = try solveLeastSquares(m, gram: g).solve(c) }
            }
        }
        let open = state.openShardEdits
        state.shardEdits += pieces.filter(\.freezes).map { $0.edits.count + ($0.edits.lowerBound == 0 ? open : 0) }
        if let router { state.router = router }
        state.editCount += requests.count
        times.apply = Date().timeIntervalSince(t0)
        return times
    }

    /// The shard size that folds edits into `state`: the one it records, else (its first edit) `ls_shard_edits`.
    /// A state begun without shards stays so (its versions replay as they were made; shards start with a new
    /// store), and one begun with them keeps their size under another editor's setting.
    func shardSize(for state: EditState) -> Int? {
        // Undecided only while new and empty (a restored state is decided): its first edit decides.
        if !state.shardSizeDecided {
            state.shardSize = config.lsShardEdits
            state.shardSizeDecided = true
        }
        return state.shardSize
    }

    /// How a call of `count` edits falls into shards of `size` when `open` edits are in the sums: consecutive
    /// pieces of the call, each ending its shard (`freezes`) when it fills it; one piece without shards.
    func shardPieces(_ count: Int, open: Int, size: Int?) -> [(edits: Range<Int>, freezes: Bool)] {
        guard let size else { return [(0..<count, false)] }
        var pieces: [(edits: Range<Int>, freezes: Bool)] = []
        var start = 0, room = size - open % size
        while start < count {
            let n = min(room, count - start)
            pieces.append((start..<(start + n), n == room))
            start += n
            room = size
        }
        return pieces.isEmpty ? [(0..<0, false)] : pieces
    }

    /// The gradient signals of `requests`, checked: each edit fits the context and gives every module a
    /// signal.
    func checkedSignals(_ requests: [EditRequest]) throws -> [String: ModuleSignals] {
        let edits = requests.map { scored($0.prompt, $0.targetNew) }
        for (i, e) in edits.enumerated() where e.targetIds.isEmpty || e.promptIds.count + e.targetIds.count > model.spec.maxPositions {
            throw EditingError.invalidInput("edit \(i): prompt + target must have 1…\(model.spec.maxPositions) tokens")
        }
        let sig = signals(requests, scored: edits)
        for m in config.modules {
            guard let s = sig[m], s.lengths.allSatisfy({ $0 > 0 }) else {
                throw EditingError.invalidInput("module \(m): an edit produced no gradient signal")
            }
        }
        return sig
    }

    /// The networks' outputs for signals `sig` given the state's past, the modules that share a network in
    /// one call. `keep`: the edits join the state's past (their representations are appended); otherwise
    /// the state is left as it is.
    func networkOutputs(_ sig: [String: ModuleSignals], state: EditState, keep: Bool) -> [String: AuxOutput] {
        let keys = networks.keys.sorted()
        let calls = keys.map { key in
            let net = networks[key]!
            return modulesOfNetwork[key]!.map { m in
                let st = state.modules[m]!
                // The past is the memo alone (MEND keeps none); a look (`keep` false) leaves it as it is.
                if keep && fusion && st.past == nil { st.past = PastProjections(layers: net.config.layerN) }
                return AuxInput(x: sig[m]!.x, lengths: sig[m]!.lengths, mode: routing[m]!.mode, pastReps: nil,
                                memo: fusion ? st.past : nil, extendsMemo: keep)
            }
        }
        // The networks are independent (each reads its own weights and its own modules' memos), so they run
        // side by side, one per core with single-threaded BLAS: a call of a few dozen rows is bound by
        // streaming the weights, which two cores do faster than one BLAS pool split over each product.
        // Each network's arithmetic is the same on any thread; its thread count is not: OpenBLAS sums some
        // products differently at one and at two threads. Side by side they run single-threaded, else at the
        // batch's count, which a replay repeats (`ReplayBatch.blasThreads`).
        let results = ResultSlots<[AuxOutput]>(count: keys.count)
        let run = {
            Parallel.forEach(keys.count, costPerItem: Parallel.minimumWork) { i in
                results[i] = self.networks[keys[i]]!.forward(tape: Tape(recording: false), inputs: calls[i], trainingNorm: false,
                                                             fusion: self.fusion)
            }
        }
        if keys.count > 1 && Parallel.cores > 1 { BLAS.singleThreaded(run) } else { run() }
        var outputs: [String: AuxOutput] = [:]
        for (i, key) in keys.enumerated() {
            for (m, out) in zip(modulesOfNetwork[key]!, results[i]!) { outputs[m] = out }
        }
        return outputs
    }

    /// The factor of `λ·C + gram` for a module (`least_squares`).
    func solveLeastSquares(_ m: String, gram: Tensor) throws -> LinearAlgebra.Cholesky {
        guard let stats = keyStatistics[m] else {
            throw EditingError.invalidInput("module \(m): least_squares needs key statistics (the editor folder has none)")
        }
        do { return try LeastSquares.factor(stats: stats, lambda: lambda(m), gram: gram) } catch {
            throw EditingError.invalidInput("module \(m): least-squares system: \(error)")
        }
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

    /// Writes `editor.json` and `editor.safetensors` (network parameters and batch-norm buffers under
    /// "<in>x<out>/<official name>", and `edit_lr.<module>`).
    public func save(to folder: URL) throws {
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        var w = SafetensorsWriter(metadata: ["format": "dafnet-editor", "method": config.method.rawValue])
        for (key, net) in networks { for (n, t) in net.stateTensors() { try w.add(key + "/" + n, t) } }
        for (_, p) in editLRs { try w.add(p.name, p.value) }
        for (_, p) in logLambdas { try w.add(p.name, p.value) }
        try LeastSquares.writeKeyStatistics(keyStatistics, to: &w)
        try w.write(to: folder.appendingPathComponent(EditorRegistry.weightsFile))
        if !subjects.isEmpty {
            try Data((subjects.joined(separator: "\n") + "\n").utf8).write(to: folder.appendingPathComponent(Self.subjectsFile), options: .atomic)
        }
        try EditorRegistry.writeConfig(config, to: folder)
    }

    /// Loads an editor folder for `model`.
    public static func load(from folder: URL, model: TransformerLM, tokenizer: Tokenizer) throws -> DAFNetEditor {
        let config = try EditorRegistry.readConfig(EditorConfig.self, from: folder)
        let editor = try DAFNetEditor(config: config, model: model, tokenizer: tokenizer)
        let wURL = folder.appendingPathComponent(EditorRegistry.weightsFile)
        let f = try SafetensorsFile(contentsOf: wURL)
        for (key, net) in editor.networks { try net.load(f, prefix: key + "/", file: wURL.path) }
        for (_, p) in editor.editLRs { p.value.assign(try f.tensor(p.name)) }
        for (_, p) in editor.logLambdas { p.value.assign(try f.tensor(p.name)) }
        if config.accumulation == .leastSquares {
            try editor.setKeyStatistics(LeastSquares.readKeyStatistics(f, modules: config.modules))
        }
        if config.routeThreshold != nil { _ = try editor.routeSite() }
        if config.contrastSubjects > 0 {
            let url = folder.appendingPathComponent(subjectsFile)
            guard let text = try? String(contentsOf: url, encoding: .utf8) else {
                throw EditingError.invalidConfig(file: EditorRegistry.configFile, field: "contrast_subjects", reason: "needs \(url.path), the subjects to draw from (one per line)")
            }
            editor.subjects = text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        }
        return editor
    }
}
