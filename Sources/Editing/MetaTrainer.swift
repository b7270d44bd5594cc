import Foundation
import LanguageModel
import Storage
import TensorCore

/// One meta-training step's losses (already weighted by their λ) and the curriculum position.
public struct MetaStepLog: Sendable {
    public var step: Int
    public var edits: Int
    public var reliability: Double
    public var generality: Double
    public var locality: Double
    public var gradNorm: Float
    public var seconds: Double
}

/// Meta-trains an editor: each episode applies a sequence of n edits (1 ≤ n ≤ the curriculum's current
/// longest) through the networks in one call, then scores the edited model on the edits (reliability),
/// their rephrasings (generality) and unrelated prompts (KL to the unedited model: locality), and
/// back-propagates through ΔW into the networks and the per-module edit learning rates (Adam, clipped).
/// Resumable from `runDir/checkpoint.safetensors`; writes a log.
public final class MetaTrainer {
    public let editor: DAFNetEditor
    public let pool: [EditRequest]
    public let runDir: URL
    public var progress: (MetaStepLog, Int) -> Void = { _, _ in }
    var cfg: MetaTrainingConfig { editor.config.training }
    let auxOpt: AdamW
    let lrOpt: AdamW
    public private(set) var step = 0

    public init(editor: DAFNetEditor, pool: [EditRequest], runDir: URL) throws {
        guard pool.contains(where: { !$0.rephrases.isEmpty }) else { throw EditingError.invalidInput("meta-training needs edits with rephrasings") }
        self.editor = editor; self.pool = pool; self.runDir = runDir
        let netParams = editor.networks.keys.sorted().flatMap { editor.networks[$0]!.parameters }
        auxOpt = AdamW(params: netParams, learningRate: editor.config.training.auxLR)
        lrOpt = AdamW(params: editor.config.modules.map { editor.editLRs[$0]! }, learningRate: editor.config.training.editLRLR)
    }

    var checkpointURL: URL { runDir.appendingPathComponent("checkpoint.safetensors") }
    public var logURL: URL { runDir.appendingPathComponent("train.log") }

    func log(_ line: String) { RunLog(url: logURL).write(line) }

    /// The curriculum: the longest sequence at a step.
    public func maxEdits(at step: Int) -> Int { min(cfg.maxSeq, 1 + (step / max(cfg.growEvery, 1)) * cfg.growBy) }

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
        for m in editor.config.modules {
            let s = caps[m]!
            let inF = s.u.shape[1], outF = s.delta.shape[1]
            BLAS.gemm(gW[m]!.data, s.u.data, s.delta.data, M: inF, N: outF, K: N, transA: true, beta: 1)
            let g = gB[m]!
            for r in 0..<N { BLAS.axpy(g.data, s.delta.data + r * outF, count: outF, alpha: 1) }
        }
        return Double(lambda * loss / maskSum)
    }

    /// The requests of a step's episode: 1 ≤ n ≤ the curriculum's longest, drawn from the pool.
    func sample(step: Int) -> [EditRequest] {
        // Each step's episode depends only on the seed and the step, so a resumed run replays exactly.
        var rng = RNG(seed: cfg.seed &+ UInt64(step) &* 104_729)
        let n = 1 + rng.index(maxEdits(at: step))
        var requests: [EditRequest] = []
        while requests.count < n {
            var r = pool[rng.index(pool.count)]
            if r.rephrases.isEmpty { continue }
            r.rephrases = [rng.choice(r.rephrases)]
            requests.append(r)
        }
        return requests
    }

    /// One episode: edits the model with `requests` in one call of the networks, and returns the weighted
    /// reliability, generality and locality losses; their gradients are *added* into the networks'
    /// parameters and the edit learning rates. The model is left unedited.
    public func episode(_ requests: [EditRequest], trainingNorm: Bool) -> (rel: Double, gen: Double, loc: Double) {
        let model = editor.model
        let edits = requests.map { editor.scored($0.prompt, $0.targetNew) }
        let gens = requests.compactMap { r in r.rephrases.first.map { editor.scored($0, r.targetNew) } }
        let locs = requests.compactMap { r in r.locality.first.map { editor.scored($0.prompt, $0.groundTruth) } }
        // Signals and locality references from the unedited model.
        model.clearEdits()
        let sig = editor.signals(edits)
        var locRef: Tensor?
        if !locs.isEmpty {
            locRef = model.forward(DAFNetEditor.lossBatch(locs).batch).copy()
        }
        // The networks: one call per module on the whole sequence (a fresh state each episode).
        let tape = Tape()
        var dW: [String: Variable] = [:], dB: [String: Variable] = [:]
        for m in editor.config.modules {
            let (key, mode) = editor.routing[m]!
            let s = sig[m]!
            let out = editor.networks[key]!.forward(tape: tape, x: s.x, lengths: s.lengths, mode: mode, pastReps: nil,
                                                    trainingNorm: trainingNorm, fusion: editor.fusion)
            dW[m] = out.deltaWeight; dB[m] = out.deltaBias
            let lr = editor.editLRs[m]!.value[0]
            let lin = model.linears[m]!
            lin.deltaWeight = out.deltaWeight.value * lr
            lin.deltaBias = editor.config.editBias ? out.deltaBias.value * lr : nil
        }
        // Losses through the edited model, as gradients with respect to each module's ΔW and Δb.
        var gW: [String: Tensor] = [:], gB: [String: Tensor] = [:]
        for m in editor.config.modules {
            let lin = model.linears[m]!
            gW[m] = Tensor(shape: [lin.inFeatures, lin.outFeatures]); gB[m] = Tensor(shape: [lin.outFeatures])
        }
        let rel = accumulate(edits, lambda: cfg.reliaLambda, ref: nil, into: &gW, &gB)
        let gen = gens.isEmpty ? 0 : accumulate(gens, lambda: cfg.genLambda, ref: nil, into: &gW, &gB)
        let loc = locs.isEmpty ? 0 : accumulate(locs, lambda: cfg.locLambda, ref: locRef, into: &gW, &gB)
        model.clearEdits()
        // Into the networks and the edit learning rates: ΔW_module = lr · ΔW_new.
        var seeds: [(Variable, Tensor)] = []
        for m in editor.config.modules {
            let lrP = editor.editLRs[m]!
            let lr = lrP.value[0]
            var dlr = Double(BLAS.dot(dW[m]!.value.data, gW[m]!.data, count: gW[m]!.count))
            seeds.append((dW[m]!, gW[m]! * lr))
            if editor.config.editBias {
                dlr += Double(BLAS.dot(dB[m]!.value.data, gB[m]!.data, count: gB[m]!.count))
                seeds.append((dB[m]!, gB[m]! * lr))
            }
            lrP.grad[0] += Float(dlr)
        }
        tape.backward(seeds: seeds)
        return (rel, gen, loc)
    }

    /// One episode and one optimiser step.
    public func trainStep() -> MetaStepLog {
        let t0 = Date()
        let requests = sample(step: step)
        auxOpt.zeroGrad(); lrOpt.zeroGrad()
        let (rel, gen, loc) = episode(requests, trainingNorm: true)
        let norm = clipGradNorm(auxOpt.params + lrOpt.params, maxNorm: cfg.gradClip)
        if norm.isFinite {
            auxOpt.update()
            lrOpt.update()
        }
        step += 1
        return MetaStepLog(step: step, edits: requests.count, reliability: rel, generality: gen, locality: loc, gradNorm: norm,
                           seconds: Date().timeIntervalSince(t0))
    }

    /// Runs until `cfg.steps` (or `stopAfter`), checkpointing and logging; writes the editor folder at the end.
    public func run(out: URL, stopAfter: Int? = nil) throws {
        try FileManager.default.createDirectory(at: runDir, withIntermediateDirectories: true)
        if FileManager.default.fileExists(atPath: checkpointURL.path) {
            try loadCheckpoint()
            log("resumed at step \(step)")
        } else {
            log("start: method \(editor.config.method), \(editor.config.modules.count) modules, \(auxOpt.params.reduce(0) { $0 + $1.value.count }) network parameters, \(pool.count) training edits")
        }
        var window: [MetaStepLog] = []
        while step < cfg.steps {
            let s = trainStep()
            window.append(s)
            if step % cfg.logEvery == 0 || step == cfg.steps {
                let k = Double(window.count)
                let lrs = editor.config.modules.map { String(format: "%.2e", editor.editLRs[$0]!.value[0]) }.joined(separator: ",")
                let line = String(format: "step %d/%d edits≤%d rel %.4f gen %.4f loc %.4f grad-norm %.2f %.2f s/step lr [%@]",
                                  step, cfg.steps, maxEdits(at: step), window.map(\.reliability).reduce(0, +) / k,
                                  window.map(\.generality).reduce(0, +) / k, window.map(\.locality).reduce(0, +) / k,
                                  window.map { Double($0.gradNorm) }.reduce(0, +) / k, window.map(\.seconds).reduce(0, +) / k, lrs)
                log(line)
                progress(s, cfg.steps)
                window.removeAll()
            }
            if step % cfg.checkpointEvery == 0 || step == cfg.steps || step == stopAfter { try saveCheckpoint() }
            if step == stopAfter { log("stopped at step \(step)"); return }
        }
        try editor.save(to: out)
        log("wrote \(out.path)")
    }

    func saveCheckpoint() throws {
        var w = SafetensorsWriter(metadata: ["step": String(step), "aux_step": String(auxOpt.step), "lr_step": String(lrOpt.step)])
        for (key, net) in editor.networks {
            for (n, t) in net.stateTensors() { try w.add(key + "/" + n, t) }
        }
        for i in auxOpt.params.indices { try w.add("adam.m.\(i)", auxOpt.m[i]); try w.add("adam.v.\(i)", auxOpt.v[i]) }
        for (i, p) in lrOpt.params.enumerated() {
            try w.add(p.name, p.value); try w.add("lr_adam.m.\(i)", lrOpt.m[i]); try w.add("lr_adam.v.\(i)", lrOpt.v[i])
        }
        let tmp = runDir.appendingPathComponent(".checkpoint.tmp")
        try w.write(to: tmp)
        guard rename(tmp.path, checkpointURL.path) == 0 else { throw EditingError.invalidInput("cannot replace \(checkpointURL.path)") }
    }

    func loadCheckpoint() throws {
        let f = try SafetensorsFile(contentsOf: checkpointURL, mode: .read)
        for (key, net) in editor.networks { try net.load(f, prefix: key + "/", file: checkpointURL.path) }
        for i in auxOpt.params.indices { auxOpt.m[i].assign(try f.tensor("adam.m.\(i)")); auxOpt.v[i].assign(try f.tensor("adam.v.\(i)")) }
        for (i, p) in lrOpt.params.enumerated() {
            p.value.assign(try f.tensor(p.name)); lrOpt.m[i].assign(try f.tensor("lr_adam.m.\(i)")); lrOpt.v[i].assign(try f.tensor("lr_adam.v.\(i)"))
        }
        guard let s = f.metadata["step"].flatMap(Int.init), let a = f.metadata["aux_step"].flatMap(Int.init),
              let l = f.metadata["lr_step"].flatMap(Int.init) else { throw EditingError.invalidInput("\(checkpointURL.path): no step") }
        step = s
        auxOpt.restore(step: a)
        lrOpt.restore(step: l)
    }
}
