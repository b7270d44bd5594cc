import Distributed
import Foundation
import LanguageModel
import Storage
import TensorCore

/// One meta-training step's losses (already weighted by their λ) and the curriculum position.
public struct MetaStepLog: Sendable {
    public var step: Int
    public var edits: Int
    /// The curriculum's longest sequence at this step.
    public var longest: Int
    public var reliability: Double
    public var generality: Double
    public var locality: Double
    public var gradNorm: Float
    public var seconds: Double
}

/// The curriculum's position: the longest sequence n, and for `plateau` the moving average of the
/// reliability loss, its best value since n last grew, and the steps since that best.
public struct CurriculumState: Sendable, Equatable {
    public var longest = 1
    public var average = Double.nan
    public var best = Double.infinity
    public var sinceBest = 0
}

/// Meta-trains an editor: each episode applies a sequence of n edits (n drawn uniformly from 1…the
/// curriculum's longest) through the networks in one causal call, then scores the edited model on a
/// sample of the edits (reliability), their rephrasings (generality) and unrelated prompts (KL to the
/// unedited model: locality), and back-propagates through ΔW into the networks, the per-module edit
/// learning rates and (`least_squares`) λ (Adam, clipped). The edits' gradient signals come from the
/// unedited model and never change, so each is computed once and cached.
/// Resumable from the checkpoint in `runDir` (sharded, see `checkpointStem`); writes a log.
///
/// A step may take several episodes (`episodes_per_step`, the global batch; their gradients averaged).
/// Under MPI they are dealt out to the ranks, the gradients summed in one allreduce; every rank draws
/// the same episodes and folds all of their rows into the batch norms, so the ranks stay in step, and
/// rank 0 alone writes the log, checkpoints and the editor, and hands its state to the others at the
/// start and at every checkpoint.
public final class MetaTrainer {
    public let editor: DAFNetEditor
    public let pool: [EditRequest]
    public let runDir: URL
    public let communicator: Communicator
    public var progress: (MetaStepLog, Int) -> Void = { _, _ in }
    /// Asked after every step (for example: a SIGTERM arrived); true checkpoints the run and stops it.
    public var shouldStop: () -> Bool = { false }

    /// How a call of `run` ended.
    public enum RunEnd: Equatable, Sendable {
        /// All steps done; the editor folder written.
        case finished
        /// At `stopAfter` (checkpointed).
        case stoppedAfter(step: Int)
        /// `shouldStop` said so (checkpointed).
        case interrupted(step: Int)
    }
    var cfg: MetaTrainingConfig { editor.config.training }
    let auxOpt: AdamW
    let lrOpt: AdamW
    let lambdaOpt: AdamW?
    public private(set) var step = 0
    public private(set) var curriculum = CurriculumState()
    /// Seconds of the last episode by stage: signals, network forward, losses through the model, backward.
    public private(set) var stageSeconds: [Double] = [0, 0, 0, 0]
    /// Gradient signals of pool edits, by pool index (the unedited model's: they never change).
    private var signalCache: [Int: [String: ModuleSignals]] = [:]
    /// Contrast rows of pool edits (`contrast_subjects`), by pool index; likewise fixed.
    private var contrastCache: [Int: [String: Tensor]] = [:]
    /// Router keys of pool edits (`route_threshold`), by pool index; likewise fixed.
    private var routeKeyCache: [Int: Tensor] = [:]

    public init(editor: DAFNetEditor, pool: [EditRequest], runDir: URL, communicator: Communicator = .single) throws {
        guard pool.contains(where: { !$0.rephrases.isEmpty }) else { throw EditingError.invalidInput("meta-training needs edits with rephrasings") }
        guard editor.config.training.episodesPerStep >= communicator.size else {
            throw EditingError.invalidInput("episodes_per_step \(editor.config.training.episodesPerStep) is smaller than the \(communicator.size) processes of the job: each needs at least one episode a step")
        }
        if editor.config.accumulation == .leastSquares && editor.keyStatistics.isEmpty {
            throw EditingError.invalidInput("least_squares meta-training needs the key statistics of the edited modules")
        }
        self.editor = editor; self.pool = pool; self.runDir = runDir; self.communicator = communicator
        curriculum.longest = editor.config.training.curriculumStart
        let netParams = editor.networks.keys.sorted().flatMap { editor.networks[$0]!.parameters }
        auxOpt = AdamW(params: netParams, learningRate: editor.config.training.auxLR)
        lrOpt = AdamW(params: editor.config.modules.map { editor.editLRs[$0]! }, learningRate: editor.config.training.editLRLR)
        let lambdas = editor.config.modules.compactMap { editor.logLambdas[$0] }
        lambdaOpt = lambdas.isEmpty ? nil : AdamW(params: lambdas, learningRate: editor.config.training.lsLambdaLR)
    }

    /// The checkpoint: `checkpoint.safetensors.index.json` and its shards (each under the repository's
    /// file limit, so a run's checkpoint can be committed), or a single `checkpoint.safetensors` of
    /// earlier runs.
    static let checkpointStem = "checkpoint"
    static let maxShardBytes = 30_000_000
    static func checkpointIndex(_ runDir: URL) -> URL { runDir.appendingPathComponent(checkpointStem + ".safetensors.index.json") }
    static func legacyCheckpoint(_ runDir: URL) -> URL { runDir.appendingPathComponent(checkpointStem + ".safetensors") }

    /// The run's checkpoint (its tensors and metadata), nil when it has none.
    static func openCheckpoint(_ runDir: URL) throws -> (source: TensorSource, metadata: [String: String], file: String)? {
        let index = checkpointIndex(runDir), legacy = legacyCheckpoint(runDir)
        if FileManager.default.fileExists(atPath: index.path) {
            let f = try ShardedSafetensors(indexURL: index, mode: .read)
            return (f, f.metadata.compactMapValues(\.stringValue), index.path)
        }
        if FileManager.default.fileExists(atPath: legacy.path) {
            let f = try SafetensorsFile(contentsOf: legacy, mode: .read)
            return (f, f.metadata, legacy.path)
        }
        return nil
    }

    /// Whether the run folder holds a checkpoint to resume from.
    public static func hasCheckpoint(runDir: URL) -> Bool {
        [checkpointIndex(runDir), legacyCheckpoint(runDir)].contains { FileManager.default.fileExists(atPath: $0.path) }
    }

    /// The key statistics a run's checkpoint holds (nil without a checkpoint), so a resumed run need not
    /// recompute them.
    public static func checkpointKeyStatistics(runDir: URL, modules: [String]) throws -> [String: Tensor]? {
        guard let c = try openCheckpoint(runDir) else { return nil }
        return try LeastSquares.readKeyStatistics(c.source, modules: modules)
    }
    public var logURL: URL { runDir.appendingPathComponent("train.log") }

    /// Appends to the run's log (rank 0's business).
    func log(_ line: String) { if communicator.isRoot { RunLog(url: logURL).write(line) } }

    /// The `linear` curriculum's longest sequence at a step.
    public func linearLongest(at step: Int) -> Int { min(cfg.maxSeq, 1 + (step / max(cfg.growEvery, 1)) * cfg.growBy) }

    /// The longest sequence the next step may draw.
    public var longest: Int {
        switch cfg.curriculum {
        case .linear: return linearLongest(at: step)
        case .plateau: return curriculum.longest
        }
    }

    /// Folds a step's reliability loss into the plateau detector; grows n by max(25 %, 10) after
    /// `plateau_patience / max(1, log10 n)` steps without a new minimum of the moving average.
    func advanceCurriculum(reliabilityLoss: Double) {
        guard cfg.curriculum == .plateau else { return }
        var c = curriculum
        c.average = c.average.isNaN ? reliabilityLoss : cfg.plateauDecay * c.average + (1 - cfg.plateauDecay) * reliabilityLoss
        if c.average < c.best { c.best = c.average; c.sinceBest = 0 } else { c.sinceBest += 1 }
        let patience = Double(cfg.plateauPatience) / max(1, log10(Double(c.longest)))
        if Double(c.sinceBest) >= patience && c.longest < cfg.maxSeq {
            c.longest = min(cfg.maxSeq, c.longest + max(c.longest / 4, 10))
            c.best = .infinity; c.sinceBest = 0
            log("curriculum: longest sequence now \(c.longest) (step \(step))")
        }
        curriculum = c
    }

    /// Gradient of a loss group through the edited model into ∂L/∂ΔW, ∂L/∂Δb per module.
    func accumulate(_ items: [ScoredPrompt], lambda: Float, ref: Tensor?, into gW: inout [String: Tensor], _ gB: inout [String: Tensor]) -> Double {
        let model = editor.model
        let (batch, labels, mask) = DAFNetEditor.lossBatch(items)
        let N = batch.B * batch.T, V = model.spec.vocabSize
        let logits = model.forward(batch)
        let d = Tensor(shape: logits.shape)
        let maskSum = max(mask.reduce(0, +), 1)
        let loss: Float
        if let ref {
            loss = Kernels.klDivergence(rows: nil, dlogits: d.data, logits: logits.data, refLogits: ref.data, mask: mask, N: N, V: V,
                                        gradScale: lambda / maskSum).sum
        } else {
            loss = Kernels.crossEntropy(losses: nil, dlogits: d.data, logits: logits.data, labels: labels, mask: mask, N: N, V: V,
                                        gradScale: lambda / maskSum).sum
        }
        let caps = model.backward(dlogits: d, parameterGradients: false, capture: Set(editor.config.modules))
        // A routed model applies ΔW only on its routed rows: only they carry its gradient.
        let routed = model.lastRoutedRows
        for m in editor.config.modules {
            let s = caps[m]!
            let inF = s.u.shape[1], outF = s.delta.shape[1]
            var u = s.u
            if let routed {
                u = s.u.copy()
                for r in 0..<N where !routed[r] { (u.data + r * inF).update(repeating: 0, count: inF) }
            }
            BLAS.gemm(gW[m]!.data, u.data, s.delta.data, M: inF, N: outF, K: N, transA: true, beta: 1)
            let g = gB[m]!
            for r in 0..<N where routed?[r] ?? true { BLAS.axpy(g.data, s.delta.data + r * outF, count: outF, alpha: 1) }
        }
        return Double(lambda * loss / maskSum)
    }

    /// One of a step's episodes: its length n (uniform in 1…longest) and the pool indices of its edits, each
    /// with one rephrasing, and the indices (into the episode) whose losses are taken.
    /// Each draw depends only on the seed, the step, the episode's place in the step and the curriculum, so
    /// a resumed run replays exactly and every rank draws the same.
    func sample(step: Int, episode: Int = 0) -> Episode {
        var rng = RNG(seed: cfg.seed &+ UInt64(step) &* 104_729 &+ UInt64(episode) &* 15_485_863)
        let n = 1 + rng.index(cfg.curriculum == .linear ? linearLongest(at: step) : curriculum.longest)
        var requests: [EditRequest] = []
        var indices: [Int] = []
        while requests.count < n {
            let i = rng.index(pool.count)
            var r = pool[i]
            if r.rephrases.isEmpty { continue }
            r.rephrases = [rng.choice(r.rephrases)]
            requests.append(r); indices.append(i)
        }
        var lossOn = Array(0..<n)
        if cfg.lossSample > 0 && n > cfg.lossSample {
            rng.shuffle(&lossOn)
            lossOn = Array(lossOn.prefix(cfg.lossSample)).sorted()
        }
        return Episode(requests: requests, indices: indices, lossOn: lossOn)
    }

    /// A drawn episode (see `sample`).
    struct Episode {
        var requests: [EditRequest]
        var indices: [Int]
        var lossOn: [Int]
    }

    /// Folds an episode's signal rows into the networks' batch norms, module by module in configuration
    /// order (as a training-mode call of the networks would).
    func foldNormStatistics(_ sig: [String: ModuleSignals]) {
        for m in editor.config.modules {
            editor.networks[editor.routing[m]!.key]!.norm.fold(sig[m]!.x)
        }
    }

    /// The cached signals of pool edits, concatenated per module. A missing one is computed alone, so its
    /// rows never depend on which other edits happened to be computed with it (a resumed run replays the
    /// uninterrupted one bit for bit).
    func signals(poolIndices: [Int], requests: [EditRequest]) -> [String: ModuleSignals] {
        for (i, r) in zip(poolIndices, requests) where signalCache[i] == nil {
            signalCache[i] = editor.signals([r])
        }
        var out: [String: ModuleSignals] = [:]
        for m in editor.config.modules {
            let parts = poolIndices.map { signalCache[$0]![m]! }
            out[m] = ModuleSignals(x: Tensor.concatenatingRows(parts.map(\.x)), lengths: parts.map { $0.lengths[0] })
        }
        return out
    }

    /// The cached contrast rows of pool edits, concatenated per module (each edit's computed alone, like
    /// its signals); empty without contrast prompts.
    func contrastRows(poolIndices: [Int], requests: [EditRequest]) -> [String: Tensor] {
        guard editor.config.contrastSubjects > 0 else { return [:] }
        for (i, r) in zip(poolIndices, requests) where contrastCache[i] == nil { contrastCache[i] = editor.contrastRows([r]) }
        var out: [String: Tensor] = [:]
        for m in editor.config.modules {
            let parts = poolIndices.compactMap { contrastCache[$0]![m] }
            if !parts.isEmpty { out[m] = Tensor.concatenatingRows(parts) }
        }
        return out
    }

    /// The episode's router (`route_threshold`; nil without): the keys of its edits, each computed alone
    /// and cached like the signals.
    func router(poolIndices: [Int]?, requests: [EditRequest]) throws -> EditRouter? {
        guard let threshold = editor.config.routeThreshold else { return nil }
        let setup = try editor.routeSetup()
        let keys: Tensor
        if let poolIndices {
            for (i, r) in zip(poolIndices, requests) where routeKeyCache[i] == nil {
                routeKeyCache[i] = try editor.routeKeys([r], layer: setup.layer, site: setup.site, whitening: setup.whitening).keys
            }
            keys = Tensor.concatenatingRows(poolIndices.map { routeKeyCache[$0]! })
        } else {
            keys = try editor.routeKeys(requests, layer: setup.layer, site: setup.site, whitening: setup.whitening).keys
        }
        return EditRouter(layer: setup.layer, site: setup.site, threshold: threshold, whitening: setup.whitening, keys: keys)
    }

    /// One episode: edits the model with `requests` in one call of the networks, and returns the weighted
    /// reliability, generality and locality losses on the edits `lossOn` (all when nil); their gradients
    /// are *added* into the networks' parameters, the edit learning rates and λ. The model is left unedited.
    /// `signals`: the episode's signals when the caller already has them (`trainStep`, which folded them into
    /// the batch norms), so they are not concatenated twice.
    public func episode(_ requests: [EditRequest], trainingNorm: Bool, poolIndices: [Int]? = nil, lossOn: [Int]? = nil)
        throws -> (rel: Double, gen: Double, loc: Double) {
        try episode(requests, trainingNorm: trainingNorm, poolIndices: poolIndices, lossOn: lossOn, signals: nil)
    }

    func episode(_ requests: [EditRequest], trainingNorm: Bool, poolIndices: [Int]?, lossOn: [Int]?, signals given: [String: ModuleSignals]?)
        throws -> (rel: Double, gen: Double, loc: Double) {
        let model = editor.model
        let chosen = (lossOn ?? Array(requests.indices)).map { requests[$0] }
        let edits = chosen.map { editor.scored($0.prompt, $0.targetNew) }
        let gens = chosen.compactMap { r in r.rephrases.first.map { editor.scored($0, r.targetNew) } }
        let locs = chosen.compactMap { r in r.locality.first.map { editor.scored($0.prompt, $0.groundTruth) } }
        // Signals and locality references from the unedited model.
        var clock = Date()
        func lap(_ i: Int) { stageSeconds[i] = Date().timeIntervalSince(clock); clock = Date() }
        model.clearEdits()
        let sig = given ?? poolIndices.map { signals(poolIndices: $0, requests: requests) }
            ?? editor.signals(requests)
        let contrast = editor.config.accumulation != .leastSquares ? [:]
            : poolIndices.map { contrastRows(poolIndices: $0, requests: requests) } ?? editor.contrastRows(requests)
        let router = try router(poolIndices: poolIndices, requests: requests)
        var locRef: Tensor?
        if !locs.isEmpty {
            locRef = model.forward(DAFNetEditor.lossBatch(locs).batch).copy()
        }
        lap(0)
        // The networks: one causal call per module on the whole sequence (a fresh state each episode), values
        // only. Each module's call is recorded again, one at a time, for its backward below: the tape of all
        // modules at once would hold every intermediate of thousands of rows.
        var factors: [String: LinearAlgebra.Cholesky] = [:], keys: [String: Tensor] = [:]
        for m in editor.config.modules {
            let (key, mode) = editor.routing[m]!
            let s = sig[m]!
            let net = editor.networks[key]!
            let tape = Tape(recording: false)
            let out = net.forward(tape: tape, x: s.x, lengths: s.lengths, mode: mode, pastReps: nil,
                                  trainingNorm: trainingNorm, fusion: editor.fusion)
            let lr = editor.editLRs[m]!.value[0]
            let lin = model.linears[m]!
            switch editor.config.accumulation {
            case .decayed:
                let (w, b) = out.products(tape: tape)
                lin.deltaWeight = w.value * lr
                lin.deltaBias = editor.config.editBias ? b.value * lr : nil
            case .leastSquares:
                let u = s.x.columnSlice(0..<net.xDim)
                let gram = LeastSquares.gram(u)
                if let c = contrast[m] { _ = LeastSquares.gram(c, into: gram) }
                let f = try editor.solveLeastSquares(m, gram: gram)
                factors[m] = f; keys[m] = u
                lin.deltaWeight = f.solve(LeastSquares.cross(u, out.values.value, alpha: lr))
                lin.deltaBias = nil
            }
        }
        model.router = router
        lap(1)
        // Losses through the edited (and routed) model, as gradients with respect to each module's ΔW and Δb.
        var gW: [String: Tensor] = [:], gB: [String: Tensor] = [:]
        for m in editor.config.modules {
            let lin = model.linears[m]!
            gW[m] = Tensor(shape: [lin.inFeatures, lin.outFeatures]); gB[m] = Tensor(shape: [lin.outFeatures])
        }
        let rel = accumulate(edits, lambda: cfg.reliaLambda, ref: nil, into: &gW, &gB)
        let gen = gens.isEmpty ? 0 : accumulate(gens, lambda: cfg.genLambda, ref: nil, into: &gW, &gB)
        let loc = locs.isEmpty ? 0 : accumulate(locs, lambda: cfg.locLambda, ref: locRef, into: &gW, &gB)
        var solved: [String: Tensor] = [:]
        for m in editor.config.modules { solved[m] = model.linears[m]!.deltaWeight }
        model.clearEdits()
        lap(2)
        // Into the networks, the edit learning rates and λ, one module's recorded call at a time (the batch
        // norm already holds this episode's rows, so the recorded call normalises exactly as the first).
        for m in editor.config.modules {
            let (key, mode) = editor.routing[m]!
            let s = sig[m]!
            let net = editor.networks[key]!
            let tape = Tape()
            let out = net.forward(tape: tape, x: s.x, lengths: s.lengths, mode: mode, pastReps: nil, trainingNorm: false,
                                  fusion: editor.fusion)
            let lrP = editor.editLRs[m]!
            let lr = lrP.value[0]
            let G = gW[m]!
            var seeds: [(Variable, Tensor)] = []
            switch editor.config.accumulation {
            case .decayed:
                // ΔW_module = lr · ΔW_new.
                let (dW, dB) = out.products(tape: tape)
                var dlr = Double(BLAS.dot(dW.value.data, G.data, count: G.count))
                seeds.append((dW, G * lr))
                if editor.config.editBias {
                    dlr += Double(BLAS.dot(dB.value.data, gB[m]!.data, count: gB[m]!.count))
                    seeds.append((dB, gB[m]! * lr))
                }
                lrP.grad[0] += Float(dlr)
            case .leastSquares:
                // ΔW = A⁻¹·lr·Uᵀx2 with A = λC + UᵀU: with Z = A⁻¹G, ∂L/∂x2 = lr·U·Z, ∂L/∂lr = ⟨G, ΔW⟩/lr,
                // ∂L/∂log λ = −λ·⟨Z, C·ΔW⟩.
                let delta = solved[m]!, u = keys[m]!
                let z = factors[m]!.solve(G)
                let seed = Tensor(shape: out.values.shape)
                BLAS.gemm(seed.data, u.data, z.data, M: u.shape[0], N: z.shape[1], K: u.shape[1], alpha: lr)
                seeds.append((out.values, seed))
                if lr != 0 { lrP.grad[0] += BLAS.dot(G.data, delta.data, count: G.count) / lr }
                let stats = editor.keyStatistics[m]!
                let cd = Tensor(shape: delta.shape)
                BLAS.gemm(cd.data, stats.data, delta.data, M: stats.shape[0], N: delta.shape[1], K: stats.shape[0])
                editor.logLambdas[m]!.grad[0] -= editor.lambda(m) * BLAS.dot(z.data, cd.data, count: z.count)
            }
            tape.backward(seeds: seeds)
        }
        lap(3)
        return (rel, gen, loc)
    }

    var optimisers: [AdamW] { [auxOpt, lrOpt] + (lambdaOpt.map { [$0] } ?? []) }

    /// One optimiser step on the mean gradient of the step's episodes (this rank's share of them, the
    /// gradients summed over the ranks). The batch norms first take every episode's rows, on every rank.
    public func trainStep() throws -> MetaStepLog {
        let t0 = Date()
        let episodes = (0..<cfg.episodesPerStep).map { sample(step: step, episode: $0) }
        let n = longest
        for o in optimisers { o.zeroGrad() }
        let share = Set(communicator.share(of: episodes.count))
        var mine: [(Episode, [String: ModuleSignals])] = []
        for (i, e) in episodes.enumerated() {
            let sig = signals(poolIndices: e.indices, requests: e.requests)
            foldNormStatistics(sig)
            if share.contains(i) { mine.append((e, sig)) }
        }
        var losses = [0.0, 0.0, 0.0]
        for (e, sig) in mine {
            let l = try episode(e.requests, trainingNorm: false, poolIndices: e.indices, lossOn: e.lossOn, signals: sig)
            losses[0] += l.rel; losses[1] += l.gen; losses[2] += l.loc
        }
        let params = optimisers.flatMap(\.params)
        try communicator.sumGradients(params, scale: 1 / Float(episodes.count))
        losses = try communicator.allreduceSum(losses).map { $0 / Double(episodes.count) }
        let norm = clipGradNorm(params, maxNorm: cfg.gradClip)
        if norm.isFinite { for o in optimisers { o.update() } }
        step += 1
        advanceCurriculum(reliabilityLoss: losses[0] / Double(max(cfg.reliaLambda, 1e-12)))
        return MetaStepLog(step: step, edits: episodes.reduce(0) { $0 + $1.requests.count }, longest: n, reliability: losses[0],
                           generality: losses[1], locality: losses[2], gradNorm: norm, seconds: Date().timeIntervalSince(t0))
    }

    /// Whether any rank was asked to stop (all ranks must stop at the same step).
    func stopRequested() throws -> Bool {
        try communicator.allreduceSum([shouldStop() ? 1 : 0])[0] > 0
    }

    /// Writes the editor folder from the run's last checkpoint without training (where a long run stands).
    public func writeEditorFromCheckpoint(out: URL) throws {
        guard Self.hasCheckpoint(runDir: runDir) else {
            throw EditingError.invalidInput("\(runDir.path): no checkpoint to write an editor from")
        }
        try loadCheckpoint()
        try editor.save(to: out)
        log("wrote the editor folder \(out.lastPathComponent) from the checkpoint at step \(step)")
    }

    /// Runs until `cfg.steps` (or `stopAfter`), checkpointing and logging; writes the editor folder at the end.
    @discardableResult
    public func run(out: URL, stopAfter: Int? = nil) throws -> RunEnd {
        if communicator.isRoot { try FileManager.default.createDirectory(at: runDir, withIntermediateDirectories: true) }
        // Rank 0's checkpoint (or fresh state) is every rank's start: its folder need not be shared.
        let resumed = communicator.isRoot && Self.hasCheckpoint(runDir: runDir)
        if resumed { try loadCheckpoint() }
        try synchronise()
        let job = "\(communicator.size) process\(communicator.size == 1 ? "" : "es"), \(cfg.episodesPerStep) episode\(cfg.episodesPerStep == 1 ? "" : "s") a step"
        if resumed {
            log("resumed at step \(step) (longest sequence \(longest)); \(job); losses \(cfg.reliaLambda)·rel + \(cfg.genLambda)·gen + \(cfg.locLambda)·loc, curriculum \(cfg.curriculum.rawValue) to \(cfg.maxSeq), patience \(cfg.plateauPatience), loss sample \(cfg.lossSample)")
        } else {
            log("start: method \(editor.config.method), \(job), \(editor.config.modules.count) modules, \(auxOpt.params.reduce(0) { $0 + $1.value.count }) network parameters, \(pool.count) training edits")
        }
        var window: [MetaStepLog] = []
        var windowStart = Date()
        while step < cfg.steps {
            let s = try trainStep()
            window.append(s)
            if step % cfg.logEvery == 0 || step == cfg.steps {
                let k = Double(window.count)
                let lrs = editor.config.modules.map { String(format: "%.2e", editor.editLRs[$0]!.value[0]) }.joined(separator: ",")
                let lambdas = editor.logLambdas.isEmpty ? "" : " λ [" + editor.config.modules.map { String(format: "%.3g", editor.lambda($0)) }.joined(separator: ",") + "]"
                let episodesPerSecond = k * Double(cfg.episodesPerStep) / max(Date().timeIntervalSince(windowStart), 1e-9)
                let line = String(format: "step %d/%d edits≤%d mean-edits %.1f rel %.4f gen %.4f loc %.4f grad-norm %.2f %.2f s/step %.2f episodes/s lr [%@]%@",
                                  step, cfg.steps, window.last!.longest, window.map { Double($0.edits) }.reduce(0, +) / k,
                                  window.map(\.reliability).reduce(0, +) / k,
                                  window.map(\.generality).reduce(0, +) / k, window.map(\.locality).reduce(0, +) / k,
                                  window.map { Double($0.gradNorm) }.reduce(0, +) / k, window.map(\.seconds).reduce(0, +) / k,
                                  episodesPerSecond, lrs, lambdas)
                log(line + String(format: " | last step: signals %.2f s, networks %.2f s, losses %.2f s, backward %.2f s",
                                         stageSeconds[0], stageSeconds[1], stageSeconds[2], stageSeconds[3]))
                progress(s, cfg.steps)
                window.removeAll(); windowStart = Date()
            }
            let interrupted = try step < cfg.steps && stopRequested()
            if step % cfg.checkpointEvery == 0 || step == cfg.steps || step == stopAfter || interrupted {
                try saveCheckpoint()
                try synchronise()
            }
            if step == stopAfter { log("stopped at step \(step)"); return .stoppedAfter(step: step) }
            if interrupted {
                log("stopped by a signal at step \(step); checkpoint written, run again to resume")
                return .interrupted(step: step)
            }
        }
        if communicator.isRoot { try editor.save(to: out) }
        log("wrote the editor folder \(out.lastPathComponent)")
        return .finished
    }

    /// The trainer's whole state as named tensors and metadata: the checkpoint's content, and what rank 0
    /// hands to the other ranks.
    func checkpointState() -> (tensors: [(String, Tensor)], metadata: [String: String]) {
        let c = curriculum
        let metadata = ["step": String(step), "aux_step": String(auxOpt.step), "lr_step": String(lrOpt.step),
                        "lambda_step": String(lambdaOpt?.step ?? 0), "curriculum_longest": String(c.longest),
                        "curriculum_average": String(c.average), "curriculum_best": String(c.best),
                        "curriculum_since_best": String(c.sinceBest)]
        var tensors: [(String, Tensor)] = []
        for key in editor.networks.keys.sorted() {
            for (n, t) in editor.networks[key]!.stateTensors().sorted(by: { $0.key < $1.key }) { tensors.append((key + "/" + n, t)) }
        }
        for i in auxOpt.params.indices { tensors.append(("adam.m.\(i)", auxOpt.m[i])) }
        for i in auxOpt.params.indices { tensors.append(("adam.v.\(i)", auxOpt.v[i])) }
        for (i, p) in lrOpt.params.enumerated() {
            tensors += [(p.name, p.value), ("lr_adam.m.\(i)", lrOpt.m[i]), ("lr_adam.v.\(i)", lrOpt.v[i])]
        }
        if let o = lambdaOpt {
            for (i, p) in o.params.enumerated() {
                tensors += [(p.name, p.value), ("lambda_adam.m.\(i)", o.m[i]), ("lambda_adam.v.\(i)", o.v[i])]
            }
        }
        tensors += LeastSquares.keyStatisticsTensors(editor.keyStatistics)
        return (tensors, metadata)
    }

    /// Rank 0 (alone) writes the checkpoint.
    func saveCheckpoint() throws {
        guard communicator.isRoot else { return }
        let (tensors, metadata) = checkpointState()
        try ShardedSafetensors.write(tensors, metadata: metadata, to: runDir, stem: Self.checkpointStem,
                                     tag: String(format: "s%06d", step), maxShardBytes: Self.maxShardBytes)
        // The single-file checkpoint of an earlier run is superseded.
        try? FileManager.default.removeItem(at: Self.legacyCheckpoint(runDir))
    }

    /// Every rank takes rank 0's state (nothing in a job of one). Each checkpoint does it again, so ranks
    /// whose sums differed in the last bits (MPI may add in another order on each of more than two ranks)
    /// continue from exactly the checkpointed state.
    func synchronise() throws {
        guard communicator.size > 1 else { return }
        let (tensors, metadata) = checkpointState()
        try communicator.broadcast(tensors)
        let bytes = try communicator.broadcast(Array(try JSONEncoder().encode(metadata)))
        guard !communicator.isRoot else { return }
        let rootMetadata = try JSONDecoder().decode([String: String].self, from: Data(bytes))
        try restore(NamedTensors(tensors), metadata: rootMetadata, file: "rank 0's state")
    }

    func loadCheckpoint() throws {
        guard let (f, metadata, file) = try Self.openCheckpoint(runDir) else { throw EditingError.invalidInput("\(runDir.path): no checkpoint") }
        try restore(f, metadata: metadata, file: file)
    }

    /// Sets the state from `checkpointState`'s tensors and metadata (a checkpoint file's, or rank 0's).
    func restore(_ f: TensorSource, metadata: [String: String], file: String) throws {
        for (key, net) in editor.networks { try net.load(f, prefix: key + "/", file: file) }
        for i in auxOpt.params.indices { auxOpt.m[i].assign(try f.tensor("adam.m.\(i)")); auxOpt.v[i].assign(try f.tensor("adam.v.\(i)")) }
        for (i, p) in lrOpt.params.enumerated() {
            p.value.assign(try f.tensor(p.name)); lrOpt.m[i].assign(try f.tensor("lr_adam.m.\(i)")); lrOpt.v[i].assign(try f.tensor("lr_adam.v.\(i)"))
        }
        guard let s = metadata["step"].flatMap(Int.init), let a = metadata["aux_step"].flatMap(Int.init),
              let l = metadata["lr_step"].flatMap(Int.init) else { throw EditingError.invalidInput("\(file): no step") }
        if let o = lambdaOpt {
            for (i, p) in o.params.enumerated() {
                p.value.assign(try f.tensor(p.name)); o.m[i].assign(try f.tensor("lambda_adam.m.\(i)")); o.v[i].assign(try f.tensor("lambda_adam.v.\(i)"))
            }
            o.restore(step: metadata["lambda_step"].flatMap(Int.init) ?? 0)
        }
        if editor.config.accumulation == .leastSquares {
            try editor.setKeyStatistics(LeastSquares.readKeyStatistics(f, modules: editor.config.modules))
        }
        if let n = metadata["curriculum_longest"].flatMap(Int.init) {
            curriculum = CurriculumState(longest: n, average: metadata["curriculum_average"].flatMap(Double.init) ?? .nan,
                                         best: metadata["curriculum_best"].flatMap(Double.init) ?? .infinity,
                                         sinceBest: metadata["curriculum_since_best"].flatMap(Int.init) ?? 0)
        }
        step = s
        auxOpt.restore(step: a)
        lrOpt.restore(step: l)
    }
}

/// Named tensors in memory as a `TensorSource` (rank 0's state as the other ranks receive it).
struct NamedTensors: TensorSource {
    let tensors: [String: Tensor]
    init(_ list: [(String, Tensor)]) { tensors = Dictionary(list, uniquingKeysWith: { a, _ in a }) }
    var tensorNames: [String] { tensors.keys.sorted() }
    func tensor(_ name: String) throws -> Tensor {
        guard let t = tensors[name] else { throw EditingError.invalidInput("state: no tensor \(name)") }
        return t
    }
}
