import ArgumentParser
import Editing
import Foundation
import LanguageModel

struct BenchEditor: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "editor",
        abstract: "Meta-training seconds per step by sequence length (stage by stage), and the auxiliary network's inference ms per edit after N past edits.")

    @OptionGroup var model: ModelOption
    @OptionGroup var editorOption: EditorOption
    @Option(help: "Meta-training edits (JSON Lines). Default: samples/dafset/train.jsonl.")
    var data: String?
    @Option(help: "Sequence lengths of the timed meta-training steps, comma-separated.")
    var lengths = "10,100,1000"
    @Option(help: "Steps timed per length (after one warm-up step).")
    var repeats = 2
    @Option(help: "Past edits before the timed inference edits.")
    var past = 1000
    @Option(help: "Edits per call in the timed inference (one call of this many edits after the past ones).")
    var batch = 1
    @Option(help: "Timed inference calls (after the past edits).")
    var calls = 10
    @Option(help: "Losses on at most this many of a step's edits (the editor's loss_sample when absent).")
    var lossSample: Int?
    @Flag(help: "Print JSON.")
    var json = false

    struct StepRow: Codable { var length: Int; var seconds: Double; var signals: Double; var networks: Double; var losses: Double; var backward: Double }
    struct Output: Codable { var steps: [StepRow]; var pastEdits: Int; var inferenceMsPerEdit: Double; var auxiliaryMsPerEdit: Double; var signalMsPerEdit: Double }

    func run() throws {
        let ns = lengths.split(separator: ",").compactMap { Int($0) }
        guard !ns.isEmpty, ns.allSatisfy({ $0 > 0 }) else { throw ValidationError("--lengths must be positive integers") }
        guard calls > 0, batch > 0 else { throw ValidationError("--calls and --batch must be positive") }
        reuseLargeAllocations()
        let folder = try model.load(requireTokenizer: true)
        let editor = try runMapped { try DAFNetEditor.load(from: editorOption.url, model: folder.model, tokenizer: folder.tokenizer!) }
        let dataURL = data.map { URL(fileURLWithPath: $0) } ?? Embedded.samples().appendingPathComponent("dafset/train.jsonl")
        let pool = try runMapped { try EditBatch.read(dataURL) }.filter { !$0.rephrases.isEmpty }
        guard pool.count >= max(ns.max()!, past + calls * batch) else { throw ValidationError("\(dataURL.path) holds \(pool.count) edits with rephrasings") }
        let run = FileManager.default.temporaryDirectory.appendingPathComponent("dafnet-bench-editor-\(getpid())")
        defer { try? FileManager.default.removeItem(at: run) }
        let trainer = try runMapped { try MetaTrainer(editor: editor, pool: pool, runDir: run) }
        var rows: [StepRow] = []
        for n in ns {
            let requests = Array(pool.prefix(n)).map { r -> EditRequest in var r = r; r.rephrases = [r.rephrases[0]]; return r }
            let cap = lossSample ?? editor.config.training.lossSample
            let lossOn = cap > 0 && n > cap ? Array(stride(from: 0, to: n, by: max(n / cap, 1)).prefix(cap)) : nil
            var row = StepRow(length: n, seconds: 0, signals: 0, networks: 0, losses: 0, backward: 0)
            for k in 0...repeats {
                let t0 = Date()
                _ = try runMapped { try trainer.episode(requests, trainingNorm: false, poolIndices: Array(0..<n), lossOn: lossOn) }
                let dt = Date().timeIntervalSince(t0)
                if k == 0 { continue }  // the warm-up step also fills the signal cache
                let st = trainer.stageSeconds
                row.seconds += dt / Double(repeats); row.signals += st[0] / Double(repeats); row.networks += st[1] / Double(repeats)
                row.losses += st[2] / Double(repeats); row.backward += st[3] / Double(repeats)
            }
            rows.append(row)
            printError(String(format: "length %d: %.2f s/step (signals %.2f, networks %.2f, losses %.2f, backward %.2f)",
                              n, row.seconds, row.signals, row.networks, row.losses, row.backward))
        }
        // Inference: `past` edits one call each, then `calls` calls of `batch` edits timed.
        let state = editor.newState()
        for r in pool.prefix(past) { _ = try runMapped { try editor.apply([r], to: state) } }
        var times = EditTimings()
        for c in 0..<calls {
            let t = try runMapped { try editor.apply(Array(pool[(past + c * batch)..<(past + (c + 1) * batch)]), to: state) }
            times.signal += t.signal; times.auxiliary += t.auxiliary; times.apply += t.apply
        }
        folder.model.clearEdits()
        let perEdit = 1000 / Double(calls * batch)
        let out = Output(steps: rows, pastEdits: past, inferenceMsPerEdit: times.total * perEdit, auxiliaryMsPerEdit: times.auxiliary * perEdit,
                         signalMsPerEdit: times.signal * perEdit)
        if json { try printJSON(out) } else {
            print("| sequence length | s/step | signals | networks | losses | backward |")
            print("|--:|--:|--:|--:|--:|--:|")
            for r in rows { print(String(format: "| %d | %.2f | %.2f | %.2f | %.2f | %.2f |", r.length, r.seconds, r.signals, r.networks, r.losses, r.backward)) }
            print(String(format: "inference after %d edits, %d per call: %.1f ms/edit (signal %.1f, auxiliary %.1f)", past, batch, out.inferenceMsPerEdit,
                         out.signalMsPerEdit, out.auxiliaryMsPerEdit))
        }
    }
}
