import ArgumentParser
import Editing
import Evaluation
import Foundation
import LanguageModel

struct BenchEdits: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "edits",
        abstract: "The sequential protocol: N edits in order, then evaluate all N; writes JSON, a Markdown table and an SVG chart.")

    @OptionGroup var model: ModelOption
    @OptionGroup var editorOption: EditorOption
    @Option(help: "Methods, comma-separated: dafnet, mend, ft, memit, alphaedit.")
    var method = "dafnet"
    @Option(help: "Editor folder for --method mend (default: samples/editor-mend).")
    var mendEditor: String?
    @Option(help: "METHOD=DIR: the editor folder of a method (repeatable; default samples/editor-METHOD; dafnet's is --editor; ft without one is built from --ft-steps/--ft-lr).")
    var editorFor: [String] = []
    @Option(help: "Numbers of sequential edits, comma-separated.")
    var counts = "1,10,100,1000"
    @Option(help: "Evaluation edits (JSON Lines). Default: samples/dafset/eval.jsonl (the world's held-out facts).")
    var data: String?
    @Option(help: "Edits per count to average over (disjoint chunks; at least one chunk).")
    var budget = 200
    @Option(help: "Held-out text for perplexity.")
    var text: String?
    @Option(help: "FT baseline: Adam steps per edit (tuned on 30 meta-training edits: 10).")
    var ftSteps = 10
    @Option(help: "FT baseline learning rate (tuned: 1e-4; 1e-3 and above wreck locality).")
    var ftLR: Float = 1e-4
    @Option(help: "Name of the dafnet rows in the results (for ablations of one method: several editors).")
    var label: String?
    @Option(help: "Folder for results.json, results.md and results.svg.")
    var out = "bench/edits"
    @Flag(help: "Print JSON.")
    var json = false

    @Option(help: "Instead of running: merge these results.json files (comma-separated; FILE=LABEL renames a file's dafnet rows) into one table and chart.")
    var merge: String?

    struct Output: Codable { var results: [SequentialBenchmark.Result] }

    func run() throws {
        if let merge {
            var results: [SequentialBenchmark.Result] = []
            for item in merge.split(separator: ",").map(String.init) {
                let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
                var rows = try runMapped { try JSONDecoder().decode(Output.self, from: Data(contentsOf: URL(fileURLWithPath: parts[0]))) }.results
                if parts.count == 2 { for i in rows.indices where rows[i].method == "dafnet" { rows[i].method = parts[1] } }
                results += rows
            }
            try write(results)
            return
        }
        let ns = counts.split(separator: ",").compactMap { Int($0) }
        guard !ns.isEmpty, ns.allSatisfy({ $0 > 0 }) else { throw ValidationError("--counts must be positive integers") }
        let folder = try model.load(requireTokenizer: true)
        let tok = folder.tokenizer!
        let dataURL = data.map { URL(fileURLWithPath: $0) } ?? Embedded.samples().appendingPathComponent("dafset/eval.jsonl")
        let pool = try runMapped { try EditBatch.read(dataURL) }
        let text = heldoutText(self.text, tokenizer: { tok.encode($0) }, limit: 200)
        var results: [SequentialBenchmark.Result] = []
        let methods = try method.split(separator: ",").map { name -> EditorMethod in
            guard let m = EditorMethod(rawValue: String(name)) else {
                throw ValidationError("unknown method \(name) (\(EditorMethod.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            return m
        }
        var folders: [EditorMethod: URL] = [.dafnet: editorOption.url]
        folders[.mend] = mendEditor.map { URL(fileURLWithPath: $0) }
        for item in editorFor {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, let m = EditorMethod(rawValue: parts[0]) else { throw ValidationError("--editor-for METHOD=DIR, not \(item)") }
            folders[m] = URL(fileURLWithPath: parts[1])
        }
        for m in methods {
            let editor: SequentialEditor
            if m == .ft && folders[.ft] == nil {
                // FT needs no folder: the dafnet editor's modules when it exists, else DAFNet's defaults.
                var c = FineTuneConfig()
                c.modules = (try? EditorRegistry.header(of: editorOption.url).modules) ?? EditorConfig.defaultModules(for: folder.model.spec)
                c.steps = ftSteps; c.learningRate = ftLR
                editor = try runMapped { try FineTuneEditor(config: c, model: folder.model, tokenizer: tok) }
            } else {
                let url = folders[m] ?? Embedded.samples().appendingPathComponent("editor-" + m.rawValue)
                editor = try runMapped { try EditorRegistry.load(from: url, model: folder.model, tokenizer: tok) }
                guard editor.method == m else { throw ValidationError("\(url.path) holds a \(editor.methodName) editor, not \(m.rawValue)") }
            }
            var rows = try runMapped {
                try SequentialBenchmark.run(editor: editor, pool: pool, counts: ns, budget: budget, heldoutText: text) { printError($0) }
            }
            if m == .dafnet, let label { for i in rows.indices { rows[i].method = label } }
            results += rows
        }
        try write(results)
    }

    func write(_ results: [SequentialBenchmark.Result]) throws { try Self.write(results, to: URL(fileURLWithPath: out), json: json) }

    /// results.json, results.md and results.svg in `dir`; the table (or the JSON) on stdout.
    static func write(_ results: [SequentialBenchmark.Result], to dir: URL, json: Bool) throws {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(Output(results: results)).write(to: dir.appendingPathComponent("results.json"))
        try (SequentialBenchmark.markdown(results) + "\n").write(to: dir.appendingPathComponent("results.md"), atomically: true, encoding: .utf8)
        try SequentialBenchmark.svg(results).write(to: dir.appendingPathComponent("results.svg"), atomically: true, encoding: .utf8)
        if json { try printJSON(Output(results: results)) } else { print(SequentialBenchmark.markdown(results)) }
    }
}
