import ArgumentParser
import Foundation
import Pipeline
import Storage

/// `dafnet report`: the store's batch history as one self-contained HTML page with charts.
struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Render STORE/evaluations/batches.jsonl as an HTML page (metrics and perplexity across versions, every batch), with a page per committed batch (each edit's scores and answers before and after).")

    @OptionGroup var location: StoreLocationOptions
    @Option(help: "Where to write the page (default: STORE/evaluations/report.html).")
    var out: String?
    @Option(help: "The page's title.")
    var title = "dafnet: batches and versions"

    func run() throws {
        try runMapped {
            let store = try location.openForReading()
            let lines = try HistoryReport.load(store)
            let page = Data(HistoryReport.html(lines, context: try HistoryReport.Context.of(store), title: title).utf8)
            let url: URL
            if let out {
                url = URL(fileURLWithPath: out)
                try page.write(to: url, options: .atomic)
            } else {
                url = try store.writeEvaluationsFile(page, named: "report.html")
            }
            // A page per committed batch beside its evaluation file (the links of the batches table).
            let pages = try HistoryReport.writeBatchPages(store, lines: lines, overwrite: true)
            print("\(url.path): \(lines.count) batch\(lines.count == 1 ? "" : "es"), \(pages.count) batch page\(pages.count == 1 ? "" : "s")")
        }
    }
}
