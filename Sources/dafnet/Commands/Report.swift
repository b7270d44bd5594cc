import ArgumentParser
import Foundation
import Pipeline

/// `dafnet report`: the store's batch history as one self-contained HTML page with charts.
struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Render STORE/evaluations/history.jsonl as an HTML page (metrics and perplexity across versions, every batch).")

    @OptionGroup var location: StoreLocationOptions
    @Option(help: "Where to write the page (default: STORE/evaluations/report.html).")
    var out: String?
    @Option(help: "The page's title.")
    var title = "dafnet: batches and versions"

    func run() throws {
        try runMapped {
            let store = try location.open()
            let lines = try HistoryReport.load(store: store.root)
            let url = out.map { URL(fileURLWithPath: $0) } ?? store.root.appendingPathComponent("evaluations/report.html")
            try Data(HistoryReport.html(lines, title: title).utf8).write(to: url, options: .atomic)
            print("\(url.path): \(lines.count) batch\(lines.count == 1 ? "" : "es")")
        }
    }
}
