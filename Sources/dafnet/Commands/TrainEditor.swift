import ArgumentParser
import Distributed
import Editing
import Evaluation
import Foundation
import LanguageModel
import Pipeline

struct TrainEditor: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train-editor",
        abstract: "Meta-train the editor (resumable; progress on stderr, log and checkpoints in the run folder).")

    @OptionGroup var model: ModelOption
    @Option(help: "Editor configuration (editor.json layout). Default: the embedded samples/editor.config.json.")
    var config: String?
    @Option(help: "Meta-training edits (JSON Lines, CounterFact layout). Default: the embedded samples/dafset/train.jsonl.")
    var data: String?
    @Option(help: "Run folder (checkpoints and train.log), relative to the current folder.")
    var runDir = "runs/editor"
    @Option(help: "Output editor folder. Default: RUN-DIR/editor.")
    var out: String?
    @Option(help: "Held-out edits the finished editor is evaluated on (the sequential protocol of bench edits). Default: the embedded samples/dafset/eval.jsonl.")
    var evalData: String?
    @Option(help: "Numbers of sequential edits of the end evaluation, comma-separated.")
    var evalCounts = "1,10,100"
    @Option(help: "Edits per count of the end evaluation (disjoint chunks).")
    var evalBudget = 50
    @Flag(help: "Skip the end evaluation.")
    var noEval = false
    @Option(help: "Override the method in the configuration: dafnet or mend.")
    var method: String?
    @Option(help: "Stop (checkpointed) after this step; rerun to resume.")
    var stopAfter: Int?
    @Flag(help: "Write the editor folder from the run's last checkpoint and stop (no training).")
    var writeEditor = false
    @Option(help: "Start the networks from this editor folder's weights (the networks of this configuration's module shapes, of the same size, each serving as many modules there; other blocks and a subset of its shapes are fine); its edit learning rates too when its accumulation rule is the configuration's.")
    var initFrom: String?
    @Option(help: "least_squares: preserved text for the key statistics, one text per line (default: the true facts of the meta-training edits, their rephrasings and neighbours).")
    var statsText: String?

    func run() throws {
        reuseLargeAllocations()
        let comm = try startJob()
        try inJob(comm) { try train(comm) }
    }

    /// Every rank of an MPI job runs this; rank 0 alone prints, writes and evaluates.
    func train(_ comm: Communicator) throws {
        let folder = try model.load(requireTokenizer: true)
        let configURL = config.map { URL(fileURLWithPath: $0) } ?? Embedded.samples().appendingPathComponent("editor.config.json")
        let dataURL = data.map { URL(fileURLWithPath: $0) } ?? Embedded.samples().appendingPathComponent("dafset/train.jsonl")
        let outURL = URL(fileURLWithPath: out ?? (runDir as NSString).appendingPathComponent("editor"))
        var cfg = try runMapped { try EditorRegistry.readConfig(EditorConfig.self, file: configURL) }
        if let method {
            guard let m = EditorMethod(rawValue: method), [.dafnet, .mend].contains(m) else {
                throw ValidationError("--method dafnet or mend (memit and alphaedit need no training: dafnet editor create)")
            }
            cfg.method = m
        }
        let chosen = cfg.modules.isEmpty
        if chosen { cfg.modules = EditorConfig.defaultModules(for: folder.model.spec) }
        comm.say("edited modules (\(chosen ? "the \(folder.model.spec.modelType) default: the MLP of the last three blocks" : "from \(configURL.lastPathComponent)")): "
                   + cfg.modules.joined(separator: ", "))
        if cfg.baseModel == nil { cfg.baseModel = model.model == nil ? "samples/model" : model.url.standardizedFileURL.lastPathComponent }
        let pool = try runMapped { try EditBatch.read(dataURL) }
        let editor = try runMapped { try DAFNetEditor(config: cfg, model: folder.model, tokenizer: folder.tokenizer!) }
        editor.initialise(seed: cfg.training.seed)
        if cfg.contrastSubjects > 0 {
            // Contrast prompts draw from the meta-training edits' subjects (written with the editor as subjects.txt).
            var seen = Set<String>()
            editor.subjects = pool.compactMap(\.subject).filter { !$0.isEmpty && seen.insert($0).inserted }
            guard editor.subjects.count > cfg.contrastSubjects else {
                throw ValidationError("contrast_subjects \(cfg.contrastSubjects) needs more subjects than \(dataURL.path) names (\(editor.subjects.count))")
            }
        }
        if let initFrom {
            let from = try runMapped { try DAFNetEditor.load(from: URL(fileURLWithPath: initFrom), model: folder.model, tokenizer: folder.tokenizer!) }
            try runMapped { try editor.warmStart(from: from) }
            comm.say("networks from \(initFrom)")
        }
        if cfg.accumulation == .leastSquares,
           let stats = try runMapped({ try MetaTrainer.checkpointKeyStatistics(runDir: URL(fileURLWithPath: runDir), modules: cfg.modules) }) {
            try runMapped { try editor.setKeyStatistics(stats) }
        } else if cfg.accumulation == .leastSquares {
            var texts = LeastSquares.preservedTexts(pool)
            if let statsText {
                texts = try textLines(statsText)
            }
            let (stats, tokens) = LeastSquares.keyStatistics(model: folder.model, tokenizer: folder.tokenizer!, modules: cfg.modules,
                                                              texts: texts) { done, total in
                comm.progress("key statistics: \(done)/\(total) texts")
            }
            try runMapped { try editor.setKeyStatistics(stats) }
            comm.say("\nkey statistics: \(tokens) tokens of \(texts.count) texts")
        }
        let trainer = try runMapped { try MetaTrainer(editor: editor, pool: pool, runDir: URL(fileURLWithPath: runDir), communicator: comm) }
        // The ETA from the last 50 steps' pace (steps get slower as the curriculum grows).
        var recent: [(Int, Date)] = []
        let episodes = Double(cfg.training.episodesPerStep)
        trainer.progress = { s, total in
            guard comm.isRoot else { return }
            recent.append((s.step, Date()))
            if recent.count > 6 { recent.removeFirst() }
            let (s0, t0) = recent.first!
            let pace = s.step > s0 ? Date().timeIntervalSince(t0) / Double(s.step - s0) : s.seconds
            // To where this run stops: --stop-after when it comes first.
            let end = min(total, stopAfter ?? total)
            let eta = pace * Double(max(end - s.step, 0))
            printProgress(String(format: "step %d/%d  rel %.3f gen %.3f loc %.3f  %.2f s/step  %.2f episodes/s  eta %.0f min to step %d",
                                 s.step, total, s.reliability, s.generality, s.locality, pace, episodes / max(pace, 1e-9), eta / 60, end))
        }
        if writeEditor {
            guard comm.size == 1 else { throw ValidationError("--write-editor runs without mpirun") }
            try runMapped { try trainer.writeEditorFromCheckpoint(out: outURL) }
            printError("wrote \(outURL.path) from the checkpoint at step \(trainer.step)")
            return
        }
        let stop = StopSignal()
        let sources = stop.requestOnTerminationSignals { name, _ in comm.say("\n\(name): stopping after the current step (checkpointed)") }
        trainer.shouldStop = { stop.isRequested }
        comm.say("log: \(trainer.logURL.path)")
        let end = try runMapped { try trainer.run(out: outURL, stopAfter: stopAfter) }
        withExtendedLifetime(sources) {}
        guard comm.isRoot else { return }
        switch end {
        case .finished:
            printError("\nwrote \(outURL.path)")
            if !noEval { try evaluate(outURL, folder: folder) }
        case let .stoppedAfter(step), let .interrupted(step):
            printError("\nstopped at step \(step) (checkpoint in \(runDir)); run the same command again to resume")
        }
    }

    /// The sequential protocol of `bench edits` on held-out edits, for the editor just written; the table is
    /// printed and kept in RUN-DIR/eval.
    func evaluate(_ editorURL: URL, folder: ModelFolder) throws {
        let counts = evalCounts.split(separator: ",").compactMap { Int($0) }.filter { $0 > 0 }
        let url = evalData.map { URL(fileURLWithPath: $0) } ?? Embedded.samples().appendingPathComponent("dafset/eval.jsonl")
        guard !counts.isEmpty, FileManager.default.fileExists(atPath: url.path) else {
            printError("no end evaluation (\(counts.isEmpty ? "no --eval-counts" : "no \(url.path)"))")
            return
        }
        let tok = folder.tokenizer!
        let editor = try runMapped { try EditorRegistry.load(from: editorURL, model: folder.model, tokenizer: tok) }
        let pool = try runMapped { try EditBatch.read(url) }
        printError("evaluating on \(url.path): counts \(counts), \(evalBudget) edits per count")
        let results = try runMapped {
            try SequentialBenchmark.run(editor: editor, pool: pool, counts: counts, budget: evalBudget,
                                        heldoutText: heldoutText(nil, tokenizer: { tok.encode($0) }, limit: 200)) { _ in }
        }
        try BenchEdits.write(results, to: URL(fileURLWithPath: runDir).appendingPathComponent("eval"), json: false)
    }
}
