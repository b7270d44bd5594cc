import ArgumentParser
import Editing
import Evaluation
import Foundation
import LanguageModel
import World

struct DAFSetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dafset", abstract: "DAFSet: meta-training and evaluation edits.",
                                                    subcommands: [DAFSetBuild.self, DAFSetRetarget.self])
}

struct DAFSetBuild: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "build",
        abstract: "Write train.jsonl (meta-training edits by property: recent, popular, long-tail, robust) and eval.jsonl (held-out edits), from the sample world or from any CounterFact/ZsRE-layout edits.")

    @Option(help: "The world folder (facts.jsonl). Default: the embedded samples/world.")
    var world: String?
    @Option(help: "Build from these edits instead of a world (JSON Lines, CounterFact or ZsRE layout); the model's likelihood of each ground truth decides long-tail, subjects are split between train and eval.")
    var edits: String?
    @Option(help: "With --edits: the share of subjects held out for eval.jsonl.")
    var evalShare = 0.15
    @Option(help: "Output folder.")
    var out = "dafset"
    @Option(help: "Model for long-tail by likelihood (default: samples/model when present).")
    var model: String?

    func run() throws {
        guard evalShare >= 0 && evalShare < 1 else { throw ValidationError("--eval-share must be in [0, 1)") }
        let modelURL = model.map { URL(fileURLWithPath: $0) } ?? Embedded.model
        let folder = FileManager.default.fileExists(atPath: modelURL.appendingPathComponent("config.json").path)
            ? try runMapped { try ModelFolder.load(modelURL, requireTokenizer: true) } : nil
        let sets: DAFSet.Sets
        if let edits {
            let requests = try runMapped { try EditBatch.read(URL(fileURLWithPath: edits)) }
            sets = try runMapped { try DAFSet.build(edits: requests, model: folder?.model, tokenizer: folder?.tokenizer, evalShare: evalShare) }
        } else {
            let worldURL = world.map { URL(fileURLWithPath: $0) } ?? Embedded.samples().appendingPathComponent("world")
            let facts = try runMapped { try FactFile.read(worldURL.appendingPathComponent("facts.jsonl")) }
            sets = DAFSet.build(facts: facts, model: folder?.model, tokenizer: folder?.tokenizer)
        }
        let dir = URL(fileURLWithPath: out)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try runMapped {
            try DAFSet.write(sets.train, to: dir.appendingPathComponent("train.jsonl"))
            try DAFSet.write(sets.eval, to: dir.appendingPathComponent("eval.jsonl"))
        }
        print("train: \(sets.train.count) edits, eval: \(sets.eval.count) edits\(folder == nil ? " (no model: no likelihood)" : "")")
    }
}

struct DAFSetRetarget: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "retarget",
        abstract: "Write the same edits with another target: an object the same relation phrasing has elsewhere (neither the edit's target nor its ground truth).")

    @Option(help: "Edits to retarget (JSON Lines). Default: the embedded samples/dafset/eval.jsonl.")
    var data: String?
    @Option(help: "Edits whose objects may serve as targets (JSON Lines). Default: the embedded samples/dafset/train.jsonl.")
    var pool: String?
    @Option(help: "Output file.")
    var out = "eval-retargeted.jsonl"

    func run() throws {
        let dafset = Embedded.samples().appendingPathComponent("dafset")
        let edits = try runMapped { try EditBatch.read(data.map { URL(fileURLWithPath: $0) } ?? dafset.appendingPathComponent("eval.jsonl")) }
        let others = try runMapped { try EditBatch.read(pool.map { URL(fileURLWithPath: $0) } ?? dafset.appendingPathComponent("train.jsonl")) }
        let result = DAFSet.retarget(edits, pool: others)
        try runMapped { try EditBatch.encode(result).write(to: URL(fileURLWithPath: out), options: .atomic) }
        print("\(result.count) of \(edits.count) edits retargeted")
    }
}
