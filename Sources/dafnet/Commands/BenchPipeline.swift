import ArgumentParser
import Editing
import Foundation
import Pipeline

/// `dafnet bench pipeline`: end-to-end throughput of the inbox pipeline.
struct BenchPipeline: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pipeline",
        abstract: "Batches/s and edits/s end to end (inbox → version, evaluation file, done/) per batch size, with the share of time per stage.")

    @OptionGroup var model: ModelOption
    @OptionGroup var editorOption: EditorOption
    @Option(help: "Batch sizes, comma-separated.")
    var sizes = "1,10,100"
    @Option(help: "Batches per size, comma-separated (one value, or one per size).")
    var batches = "10,5,3"
    @Option(help: "Edits to draw batches from (JSON Lines). Default: samples/dafset/eval.jsonl, else the held-out facts of samples/world/facts.jsonl.")
    var data: String?
    @Option(help: "Held-out text for perplexity (default: samples/world/heldout_text.txt).")
    var text: String?
    @Option(help: "Held-out lines used for perplexity.")
    var textLines = 100
    @Option(help: "Canary facts (default: samples/world/facts.jsonl).")
    var canaries: String?
    @Option(help: "Working folder (removed afterwards unless --keep).")
    var work: String?
    @Flag(help: "Keep the working folder.")
    var keep = false
    @Option(help: "Measure with a randomly initialised editor of this configuration (editor.json layout) instead of --editor: the speed depends only on the shapes, so this measures before an editor is trained.")
    var randomEditor: String?
    @Flag(help: "Print JSON.")
    var json = false

    struct Output: Encodable {
        var model: String
        var editor: String
        var rows: [PipelineBenchmark.Row]
    }

    func run() throws {
        let ns = sizes.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        let bs = batches.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !ns.isEmpty, ns.allSatisfy({ $0 > 0 }) else { throw ValidationError("--sizes must be positive integers") }
        guard bs.count == 1 || bs.count == ns.count, bs.allSatisfy({ $0 > 0 }) else {
            throw ValidationError("--batches: one positive count, or one per size")
        }
        let folder = try model.load(requireTokenizer: true)
        let tok = folder.tokenizer!
        let editor: SequentialEditor
        if let randomEditor {
            var cfg = try runMapped { try EditorRegistry.readConfig(EditorConfig.self, file: URL(fileURLWithPath: randomEditor)) }
            if cfg.modules.isEmpty { cfg.modules = EditorConfig.defaultModules(for: folder.model.spec) }
            let random = try runMapped { try DAFNetEditor(config: cfg, model: folder.model, tokenizer: tok) }
            random.initialise(seed: cfg.training.seed)
            editor = random
        } else {
            editor = try runMapped { try EditorRegistry.load(from: editorOption.url, model: folder.model, tokenizer: tok) }
        }
        let editorLabel = randomEditor.map { "random editor of \($0)" } ?? editorOption.url.path
        let samples = Embedded.samples()
        let pool: [EditRequest]
        if let data {
            pool = try runMapped { try EditBatch.read(URL(fileURLWithPath: data)) }
        } else if FileManager.default.fileExists(atPath: samples.appendingPathComponent("dafset/eval.jsonl").path) {
            pool = try runMapped { try EditBatch.read(samples.appendingPathComponent("dafset/eval.jsonl")) }
        } else {
            pool = try runMapped { try Self.heldoutFacts(samples.appendingPathComponent("world/facts.jsonl")) }
        }
        let fitting = pool.filter { r in
            let s = editor.scored(r.prompt, r.targetNew)
            return !s.targetIds.isEmpty && s.promptIds.count + s.targetIds.count <= folder.model.spec.maxPositions
        }
        let texts = textLines == 0 ? [] : heldoutText(text, tokenizer: { tok.encode($0) }, limit: textLines)
        let canaryURL = canaries.map { URL(fileURLWithPath: $0) } ?? samples.appendingPathComponent("world/facts.jsonl")
        let probes = FileManager.default.fileExists(atPath: canaryURL.path) ? try runMapped { try Canaries.load(canaryURL, limit: 20) } : []
        let resources = PipelineResources(heldoutText: texts, canaries: probes, canaryNote: probes.isEmpty ? "no canary file" : nil)
        var settings = PipelineSettings()
        settings.collapseGuard.enabled = false  // measured, not enforced: every batch commits
        let workURL = work.map { URL(fileURLWithPath: $0) }
            ?? FileManager.default.temporaryDirectory.appendingPathComponent("dafnet-bench-pipeline-\(getpid())")
        defer { if !keep { try? FileManager.default.removeItem(at: workURL) } }
        let rows = try runMapped {
            try PipelineBenchmark.run(editor: editor, pool: fitting, sizes: ns, batches: { size in
                bs.count == 1 ? bs[0] : bs[ns.firstIndex(of: size)!]
            }, resources: resources, settings: settings, workDir: workURL) { printError($0) }
        }
        if json {
            try printJSON(Output(model: model.url.path, editor: editorLabel, rows: rows))
        } else {
            print("model \(model.url.path), editor \(editorLabel)\n")
            print(PipelineBenchmark.markdown(rows))
        }
    }

    /// The held-out facts of a world's facts.jsonl as edits (CounterFact fields; the `split` is kept as an extra).
    static func heldoutFacts(_ url: URL) throws -> [EditRequest] {
        let data = try Data(contentsOf: url)
        var keep = Data()
        for line in data.split(separator: UInt8(ascii: "\n")) {
            if let s = String(data: Data(line), encoding: .utf8), s.contains("\"split\":\"heldout\"") {
                keep.append(Data(line)); keep.append(UInt8(ascii: "\n"))
            }
        }
        return try EditBatch.parse(keep, file: url.lastPathComponent)
    }
}
