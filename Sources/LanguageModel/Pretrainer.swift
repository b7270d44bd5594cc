import Distributed
import Foundation
import Storage
import TensorCore
import Tokenizers

/// Settings of a pre-training run (the committed `samples/pretrain.json`).
public struct PretrainConfig: Codable, Sendable {
    /// The world's facts (JSON Lines), the output model folder, and the run folder (checkpoints, log),
    /// relative to the current directory.
    public var world = "samples/world/facts.jsonl"
    public var out = "samples/model"
    public var runDir = "runs/pretrain"
    public var seed: UInt64 = 1
    public var vocabSize = 4096
    public var nEmbd = 256
    public var nLayer = 4
    public var nHead = 4
    public var nPositions = 128
    public var batchSize = 16
    /// Tokens per training sequence (≤ nPositions).
    public var seqLen = 128
    public var maxLR: Float = 1e-3
    public var minLR: Float = 1e-4
    public var warmupSteps = 200
    public var weightDecay: Float = 0.01
    public var gradClip: Float = 1.0
    /// Passes over the corpus.
    public var passes = 1
    public var checkpointEvery = 100
    public var logEvery = 10

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case world, out, runDir = "run_dir", seed, vocabSize = "vocab_size", nEmbd = "n_embd", nLayer = "n_layer", nHead = "n_head"
        case nPositions = "n_positions", batchSize = "batch_size", seqLen = "seq_len", maxLR = "max_lr", minLR = "min_lr"
        case warmupSteps = "warmup_steps", weightDecay = "weight_decay", gradClip = "grad_clip", passes
        case checkpointEvery = "checkpoint_every", logEvery = "log_every"
    }

    /// A missing key keeps its default; an unknown one is an error.
    public init(from decoder: Decoder) throws {
        try rejectUnknownKeys(decoder, CodingKeys.self)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init()
        world = try c.value(.world, world); out = try c.value(.out, out); runDir = try c.value(.runDir, runDir)
        seed = try c.value(.seed, seed); vocabSize = try c.value(.vocabSize, vocabSize); nEmbd = try c.value(.nEmbd, nEmbd)
        nLayer = try c.value(.nLayer, nLayer); nHead = try c.value(.nHead, nHead); nPositions = try c.value(.nPositions, nPositions)
        batchSize = try c.value(.batchSize, batchSize); seqLen = try c.value(.seqLen, seqLen); maxLR = try c.value(.maxLR, maxLR)
        minLR = try c.value(.minLR, minLR); warmupSteps = try c.value(.warmupSteps, warmupSteps)
        weightDecay = try c.value(.weightDecay, weightDecay); gradClip = try c.value(.gradClip, gradClip)
        passes = try c.value(.passes, passes); checkpointEvery = try c.value(.checkpointEvery, checkpointEvery)
        logEvery = try c.value(.logEvery, logEvery)
    }
}

/// Packs tokenized sentences into training sequences: each sequence starts at a sentence, sentences are
/// followed by the end-of-text token, and the unused tail is padding whose labels are masked.
public struct PackedCorpus: Sendable {
    public let T: Int
    /// [count, T + 1] token ids (inputs are columns 0..<T, labels 1...T).
    public let tokens: [Int32]
    /// [count, T] label mask.
    public let mask: [Float]
    public var count: Int { tokens.count / (T + 1) }
    public var realTokens: Int { Int(mask.reduce(0, +)) }

    public init(sentences: [[Int]], T: Int, eos: Int) {
        self.T = T
        var toks: [Int32] = []
        var mask: [Float] = []
        var cur: [Int32] = []
        func flush() {
            if cur.isEmpty { return }
            let real = cur.count
            cur += Array(repeating: Int32(eos), count: T + 1 - cur.count)
            toks += cur
            // Label t is token t+1: real while t+1 < real.
            mask += (0..<T).map { $0 + 1 < real ? 1 : 0 }
            cur = []
        }
        for s in sentences {
            let piece = s.prefix(T).map(Int32.init) + [Int32(eos)]
            if cur.count + piece.count > T + 1 { flush() }
            cur += piece.prefix(T + 1)
        }
        flush()
        tokens = toks
        self.mask = mask
    }
}

/// A resumable pre-training run: tokenizer training, packing, AdamW with warm-up and cosine decay,
/// checkpoints every few steps, a log file, and an HF folder at the end.
/// Under MPI each step's batch is dealt out to the ranks by sequence and the gradients are summed in
/// one allreduce (the loss is normalised by the whole batch's tokens, so the step is the same); rank 0
/// alone trains the tokenizer, writes the log, checkpoints and the model, and hands the others its
/// tokenizer and state at the start and its state at every checkpoint.
public final class Pretrainer {
    public let config: PretrainConfig
    public let runDir: URL
    public let communicator: Communicator
    public var progress: (String) -> Void = { _ in }

    public init(config: PretrainConfig, runDir: URL, communicator: Communicator = .single) {
        self.config = config
        self.runDir = runDir
        self.communicator = communicator
    }

    var checkpointURL: URL { runDir.appendingPathComponent("checkpoint.safetensors") }
    var tokenizerDir: URL { runDir.appendingPathComponent("tokenizer") }
    public var logURL: URL { runDir.appendingPathComponent("train.log") }

    func log(_ line: String) { if communicator.isRoot { RunLog(url: logURL).write(line) } }

    /// Trains the tokenizer on the distinct sentences (once; reused on resume); under MPI rank 0 does and
    /// the others load its files (they need not share the run folder).
    public func tokenizer(sentences: [String]) throws -> Tokenizer {
        guard communicator.size > 1 else { return try trainedTokenizer(sentences: sentences) }
        let names = ["tokenizer.json", "tokenizer_config.json"]
        if communicator.isRoot { _ = try trainedTokenizer(sentences: sentences) }
        let local = FileManager.default.temporaryDirectory.appendingPathComponent("dafnet-rank\(communicator.rank)-\(getpid())-tokenizer")
        if !communicator.isRoot { try FileManager.default.createDirectory(at: local, withIntermediateDirectories: true) }
        defer { if !communicator.isRoot { try? FileManager.default.removeItem(at: local) } }
        for name in names {
            let url = tokenizerDir.appendingPathComponent(name)
            let mine = communicator.isRoot ? ((try? Data(contentsOf: url)).map { [UInt8]($0) } ?? []) : []
            let bytes = try communicator.broadcast(mine)
            if !communicator.isRoot && !bytes.isEmpty { try Data(bytes).write(to: local.appendingPathComponent(name)) }
        }
        return try Tokenizer.load(folder: communicator.isRoot ? tokenizerDir : local)
    }

    func trainedTokenizer(sentences: [String]) throws -> Tokenizer {
        if FileManager.default.fileExists(atPath: tokenizerDir.appendingPathComponent("tokenizer.json").path) {
            return try Tokenizer.load(folder: tokenizerDir)
        }
        var seen = Set<String>()
        let distinct = sentences.filter { seen.insert($0).inserted }
        let trained = try BPETrainer.train(text: distinct.joined(separator: "\n"),
                                           options: BPETrainingOptions(vocabSize: config.vocabSize, modelMaxLength: config.nPositions))
        try trained.write(to: tokenizerDir)
        log("tokenizer: \(trained.vocabulary.count) tokens from \(distinct.count) distinct sentences in \(String(format: "%.1f", trained.seconds)) s")
        return try Tokenizer.load(folder: tokenizerDir)
    }

    /// Runs (or resumes) training and writes the model folder to `out`. `stopAfter` ends the run early
    /// at that step, checkpointed and without writing the folder (as an interruption would).
    public func run(sentences: [String], out: URL, stopAfter: Int? = nil) throws {
        if communicator.isRoot { try FileManager.default.createDirectory(at: runDir, withIntermediateDirectories: true) }
        guard config.batchSize >= communicator.size else {
            throw LMError.invalidInput("batch_size \(config.batchSize) is smaller than the \(communicator.size) processes of the job: each needs at least one sequence a step")
        }
        let tok = try tokenizer(sentences: sentences)
        guard let eos = tok.eosTokenID ?? tok.id(for: "<|endoftext|>") else {
            throw LMError.invalidInput("the tokenizer has no end-of-text token")
        }
        var cache: [String: [Int]] = [:]
        let ids = sentences.map { s -> [Int] in
            if let c = cache[s] { return c }
            let e = tok.encode(s)
            cache[s] = e
            return e
        }
        let corpus = PackedCorpus(sentences: ids, T: config.seqLen, eos: eos)
        let B = config.batchSize, T = config.seqLen
        let stepsPerPass = corpus.count / B
        let totalSteps = stepsPerPass * config.passes
        var gpt = GPT2Configuration(vocabSize: tok.vocabSize, nPositions: config.nPositions, nEmbd: config.nEmbd,
                                    nLayer: config.nLayer, nHead: config.nHead, bosTokenId: eos, eosTokenId: eos)
        gpt.tieWordEmbeddings = true
        let model = TransformerLM(spec: gpt.spec())
        model.initialise(seed: config.seed)
        let opt = AdamW(params: model.parameters, learningRate: config.maxLR, beta1: 0.9, beta2: 0.95, weightDecay: config.weightDecay)
        let schedule = CosineSchedule(maxLR: config.maxLR, minLR: config.minLR, warmupSteps: config.warmupSteps, totalSteps: totalSteps)
        var step = 0
        let resumed = communicator.isRoot && FileManager.default.fileExists(atPath: checkpointURL.path)
        if resumed { step = try loadCheckpoint(model: model, opt: opt) }
        step = try synchronise(model: model, opt: opt, step: step)
        let job = "\(communicator.size) process\(communicator.size == 1 ? "" : "es")"
        if resumed {
            log("resumed at step \(step); \(job)")
        } else {
            log("start: \(job), \(model.parameterCount) parameters, \(corpus.count) sequences of \(T) (\(corpus.realTokens) real tokens), \(totalSteps) steps")
        }
        // This rank's sequences of each step's batch (dealt out in turn).
        let mine = communicator.share(of: B)
        let Bl = mine.count
        // The order of sequences for each pass: a seeded permutation.
        func order(pass: Int) -> [Int] {
            var rng = RNG(seed: config.seed &+ UInt64(pass) &* 7919)
            var o = Array(0..<corpus.count)
            rng.shuffle(&o)
            return o
        }
        var currentPass = -1
        var perm: [Int] = []
        let dlogits = Tensor(shape: [Bl * T, tok.vocabSize])
        var batchIds = [Int32](repeating: 0, count: Bl * T)
        var labels = [Int32](repeating: 0, count: Bl * T)
        var mask = [Float](repeating: 0, count: Bl * T)
        var lossSum = 0.0, tokenSum = 0.0
        var windowStart = Date()
        let started = Date()
        let startStep = step
        while step < totalSteps {
            let pass = step / stepsPerPass
            if pass != currentPass { perm = order(pass: pass); currentPass = pass }
            let base = (step % stepsPerPass) * B
            for (b, i) in mine.enumerated() {
                let s = perm[base + i]
                for t in 0..<T {
                    batchIds[b * T + t] = corpus.tokens[s * (T + 1) + t]
                    labels[b * T + t] = corpus.tokens[s * (T + 1) + t + 1]
                    mask[b * T + t] = corpus.mask[s * T + t]
                }
            }
            // The whole batch's real tokens (every rank holds the corpus), so each rank's share of the
            // gradient is normalised as the whole batch's is.
            var batchTokens: Float = 0
            for i in 0..<B { let s = perm[base + i]; for t in 0..<T { batchTokens += corpus.mask[s * T + t] } }
            let maskSum = max(batchTokens, 1)
            opt.learningRate = schedule.learningRate(step: step)
            model.zeroGradients()
            let logits = model.forward(TokenBatch(ids: batchIds, B: Bl, T: T))
            dlogits.zero()
            let (localLoss, _) = Kernels.crossEntropy(losses: nil, dlogits: dlogits.data, logits: logits.data, labels: labels, mask: mask,
                                                      N: Bl * T, V: tok.vocabSize, gradScale: 1 / maskSum)
            model.backward(dlogits: dlogits)
            try communicator.sumGradients(model.parameters)
            let loss = try communicator.allreduceSum([Double(localLoss)])[0]
            let norm = clipGradNorm(model.parameters, maxNorm: config.gradClip)
            opt.update()
            step += 1
            lossSum += loss; tokenSum += Double(maskSum)
            if step % config.logEvery == 0 || step == totalSteps {
                let elapsed = Date().timeIntervalSince(windowStart)
                let tps = Double(config.logEvery * B * T) / max(elapsed, 1e-9)
                // To where this run stops: stopAfter when it comes first.
                let end = min(totalSteps, stopAfter ?? totalSteps)
                let eta = Double(max(end - step, 0)) * Date().timeIntervalSince(started) / Double(max(step - startStep, 1))
                let line = String(format: "step %d/%d loss %.4f lr %.2e grad-norm %.2f %.0f tokens/s eta %.0f min to step %d",
                                  step, totalSteps, lossSum / tokenSum, opt.learningRate, norm, tps, eta / 60, end)
                log(line)
                progress(line)
                lossSum = 0; tokenSum = 0; windowStart = Date()
            }
            if step % config.checkpointEvery == 0 || step == totalSteps || step == stopAfter {
                try saveCheckpoint(model: model, opt: opt, step: step)
                _ = try synchronise(model: model, opt: opt, step: step)
            }
            if step == stopAfter { log("stopped at step \(step)"); return }
        }
        guard communicator.isRoot else { return }
        let configData = try JSONSerialization.data(withJSONObject: gpt.jsonObject(), options: [.prettyPrinted, .sortedKeys])
        try ModelFolder.write(model: model, configData: configData, to: out, tokenizerFrom: tokenizerDir)
        log("wrote \(out.path)")
    }

    /// Every rank takes rank 0's parameters, Adam moments and step (nothing in a job of one); returns the step.
    func synchronise(model: TransformerLM, opt: AdamW, step: Int) throws -> Int {
        guard communicator.size > 1 else { return step }
        var tensors: [(String, Tensor)] = []
        for (i, p) in model.parameters.enumerated() {
            tensors += [(p.name, p.value), ("adam.m." + p.name, opt.m[i]), ("adam.v." + p.name, opt.v[i])]
        }
        try communicator.broadcast(tensors)
        var steps = [Int64(step), Int64(opt.step)]
        try steps.withUnsafeMutableBytes { try communicator.broadcast($0.baseAddress!, bytes: $0.count) }
        opt.restore(step: Int(steps[1]))
        return Int(steps[0])
    }

    /// Rank 0 (alone) writes the checkpoint.
    func saveCheckpoint(model: TransformerLM, opt: AdamW, step: Int) throws {
        guard communicator.isRoot else { return }
        var w = SafetensorsWriter(metadata: ["step": String(step), "adam_step": String(opt.step)])
        for (i, p) in model.parameters.enumerated() {
            try w.add(p.name, p.value)
            try w.add("adam.m." + p.name, opt.m[i])
            try w.add("adam.v." + p.name, opt.v[i])
        }
        let tmp = runDir.appendingPathComponent(".checkpoint.tmp")
        try w.write(to: tmp)
        // rename(2) replaces the old checkpoint atomically: a crash leaves the old or the new one.
        guard rename(tmp.path, checkpointURL.path) == 0 else {
            throw LMError.invalidInput("\(checkpointURL.path): cannot replace the checkpoint (errno \(errno))")
        }
    }

    func loadCheckpoint(model: TransformerLM, opt: AdamW) throws -> Int {
        let f = try SafetensorsFile(contentsOf: checkpointURL, mode: .read)
        for (i, p) in model.parameters.enumerated() {
            p.value.assign(try f.tensor(p.name))
            opt.m[i].assign(try f.tensor("adam.m." + p.name))
            opt.v[i].assign(try f.tensor("adam.v." + p.name))
        }
        guard let step = f.metadata["step"].flatMap(Int.init), let adam = f.metadata["adam_step"].flatMap(Int.init) else {
            throw LMError.invalidInput("\(checkpointURL.path): checkpoint metadata lacks the step")
        }
        opt.restore(step: adam)
        return step
    }
}
