import ArgumentParser
import Editing
import Foundation
import LanguageModel

struct TrainEditor: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train-editor",
        abstract: "Meta-train the editor (resumable; progress on stderr, log and checkpoints in the run folder).")

    @OptionGroup var model: ModelOption
    @Option(help: "Editor configuration (editor.json layout).")
    var config = "samples/editor.config.json"
    @Option(help: "Meta-training edits (JSON Lines, CounterFact layout).")
    var data = "samples/dafset/train.jsonl"
    @Option(help: "Run folder.")
    var runDir = "runs/editor"
    @Option(help: "Output editor folder.")
    var out = "samples/editor"
    @Option(help: "Override the method in the configuration: dafnet or mend.")
    var method: String?
    @Option(help: "Stop (checkpointed) after this step; rerun to resume.")
    var stopAfter: Int?

    func run() throws {
        let folder = try model.load(requireTokenizer: true)
        var cfg = try runMapped { try JSONDecoder().decode(EditorConfig.self, from: Data(contentsOf: URL(fileURLWithPath: config))) }
        if let method { cfg.method = method }
        if cfg.modules.isEmpty { cfg.modules = EditorConfig.defaultModules(for: folder.model.spec) }
        let pool = try runMapped { try EditBatch.read(URL(fileURLWithPath: data)) }
        let editor = try runMapped { try DAFNetEditor(config: cfg, model: folder.model, tokenizer: folder.tokenizer!) }
        editor.initialise(seed: cfg.training.seed)
        let trainer = try runMapped { try MetaTrainer(editor: editor, pool: pool, runDir: URL(fileURLWithPath: runDir)) }
        let start = Date()
        trainer.progress = { s, total in
            let eta = Date().timeIntervalSince(start) / Double(max(s.step, 1)) * Double(total - s.step)
            FileHandle.standardError.write(Data(String(format: "\r\u{1B}[Kstep %d/%d  rel %.3f gen %.3f loc %.3f  %.2f s/step  eta %.0f min",
                                                       s.step, total, s.reliability, s.generality, s.locality, s.seconds, eta / 60).utf8))
        }
        printError("log: \(trainer.logURL.path)")
        try runMapped { try trainer.run(out: URL(fileURLWithPath: out), stopAfter: stopAfter) }
        printError(trainer.step >= cfg.training.steps ? "\nwrote \(out)" : "\nstopped at step \(trainer.step); run again to resume")
    }
}
