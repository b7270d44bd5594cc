import ArgumentParser
import Evaluation
import Foundation
import LanguageModel
import World

struct Facts: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Top-1 accuracy on the world's facts by split and phrasing, and held-out perplexity.")

    @OptionGroup var model: ModelOption
    @OptionGroup var stored: StoredVersionOptions
    @OptionGroup var editorOption: EditorOption
    @Option(help: "Facts (JSON Lines). Default: samples/world/facts.jsonl.")
    var data: String?
    @Option(help: "Held-out text, one sentence a line. Default: heldout_text.txt beside the facts.")
    var text: String?
    @Option(help: "Score at most this many facts per split and phrasing.")
    var limit: Int?
    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let folder = try model.load(requireTokenizer: true)
        let label = try stored.install(on: folder, editor: editorOption.url)
        let dataURL = data.map { URL(fileURLWithPath: $0) } ?? Embedded.samples().appendingPathComponent("world/facts.jsonl")
        let facts = try runMapped { try FactFile.read(dataURL) }
        let textURL = text.map { URL(fileURLWithPath: $0) } ?? dataURL.deletingLastPathComponent().appendingPathComponent("heldout_text.txt")
        let lines = (try? String(contentsOf: textURL, encoding: .utf8))?.split(separator: "\n").map(String.init) ?? []
        let report = FactsReport.measure(model: folder.model, tokenizer: folder.tokenizer!, facts: facts, heldoutText: lines,
                                         modelName: folder.url.path + (label.map { " with \($0)" } ?? ""), limitPerSplit: limit)
        if json { try printJSON(report) } else { print(report.table()) }
    }
}
