import Editing
import Foundation
import LanguageModel

/// The paper's sequential protocol: apply N edits in order (one call each), then evaluate all N
/// (reliability, generality, locality, perplexity on held-out text); restore the unedited model; repeat on
/// disjoint chunks and average.
public enum SequentialBenchmark {
    public struct Result: Codable, Sendable {
        public var method: String
        public var n: Int
        public var chunks: Int
        public var reliability: Double
        public var generality: Double
        public var locality: Double
        public var perplexityRatio: Double
        public var msPerEdit: Double
        public var signalMsPerEdit: Double
        public var auxiliaryMsPerEdit: Double
        public var applyMsPerEdit: Double
        /// Edit-state bytes after N edits, divided by N.
        public var stateBytesPerEdit: Double

        enum CodingKeys: String, CodingKey {
            case method, n, chunks, reliability, generality, locality
            case perplexityRatio = "perplexity_ratio", msPerEdit = "ms_per_edit", signalMsPerEdit = "signal_ms_per_edit"
            case auxiliaryMsPerEdit = "auxiliary_ms_per_edit", applyMsPerEdit = "apply_ms_per_edit"
            case stateBytesPerEdit = "state_bytes_per_edit"
        }
    }

    /// Chunks for a count: as many disjoint chunks as `pool` holds, at most `budget / n` (at least one).
    public static func chunkCount(n: Int, pool: Int, budget: Int) -> Int { max(1, min(pool / max(n, 1), budget / max(n, 1))) }

    public static func run(editor: SequentialEditor, pool: [EditRequest], counts: [Int], budget: Int = 200,
                           heldoutText: [[Int]], progress: (String) -> Void = { _ in }) throws -> [Result] {
        let model = editor.model
        model.clearEdits()
        let basePPL = model.perplexity(heldoutText)
        var results: [Result] = []
        for n in counts {
            guard n <= pool.count else { throw EditingError.invalidInput("\(n) edits asked for, the data holds \(pool.count)") }
            let chunks = chunkCount(n: n, pool: pool.count, budget: budget)
            var rel = 0.0, gen = 0.0, loc = 0.0, ppl = 0.0, bytes = 0.0
            var times = EditTimings()
            for c in 0..<chunks {
                let requests = Array(pool[(c * n)..<((c + 1) * n)])
                model.clearEdits()
                let ref = try EditMetrics.localityReference(editor: editor, requests)
                let state = editor.newState()
                for r in requests {
                    let t = try editor.apply([r], to: state)
                    times.signal += t.signal; times.auxiliary += t.auxiliary; times.apply += t.apply
                }
                editor.install(state)
                let ev = try EditMetrics.evaluate(editor: editor, requests, localityReference: ref)
                rel += ev.reliability; gen += ev.generality ?? 0; loc += ev.locality ?? 0
                ppl += model.perplexity(heldoutText) / basePPL
                bytes += Double(state.byteCount) / Double(n)
                model.clearEdits()
                progress(String(format: "%@ N=%d chunk %d/%d: rel %.3f gen %.3f loc %.3f", editor.methodName, n, c + 1, chunks,
                                ev.reliability, ev.generality ?? 0, ev.locality ?? 0))
            }
            let k = Double(chunks), edits = Double(chunks * n)
            results.append(Result(method: editor.methodName, n: n, chunks: chunks, reliability: rel / k, generality: gen / k,
                                  locality: loc / k, perplexityRatio: ppl / k, msPerEdit: times.total * 1000 / edits,
                                  signalMsPerEdit: times.signal * 1000 / edits, auxiliaryMsPerEdit: times.auxiliary * 1000 / edits,
                                  applyMsPerEdit: times.apply * 1000 / edits, stateBytesPerEdit: bytes / k))
        }
        return results
    }

    public static func markdown(_ results: [Result]) -> String {
        var lines = ["| method | N | chunks | reliability | generality | locality | perplexity ratio | ms/edit (signal / aux / apply) | state KB/edit |",
                     "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in results {
            lines.append(String(format: "| %@ | %d | %d | %.3f | %.3f | %.3f | %.3f | %.1f (%.1f / %.1f / %.1f) | %.1f |", r.method, r.n, r.chunks,
                                r.reliability, r.generality, r.locality, r.perplexityRatio, r.msPerEdit, r.signalMsPerEdit,
                                r.auxiliaryMsPerEdit, r.applyMsPerEdit, r.stateBytesPerEdit / 1024))
        }
        return lines.joined(separator: "\n")
    }

    /// Reliability, generality and locality against N (log scale), one colour per method.
    public static func svg(_ results: [Result]) -> String {
        let W = 720.0, H = 300.0, pad = 40.0, panelW = (W - pad) / 3
        let ns = Set(results.map(\.n)).sorted()
        let lo = log10(Double(ns.first ?? 1)), hi = max(log10(Double(ns.last ?? 10)), lo + 1)
        let colours = ["dafnet": "#1f77b4", "mend": "#ff7f0e", "ft": "#2ca02c"]
        let others = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
        func colour(_ method: String) -> String {
            colours[method] ?? others[(Set(results.map(\.method)).subtracting(colours.keys).sorted().firstIndex(of: method) ?? 0) % others.count]
        }
        var out = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(W))\" height=\"\(Int(H))\" font-family=\"sans-serif\" font-size=\"11\">\n"
        out += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        let metrics: [(String, (Result) -> Double)] = [("reliability", \.reliability), ("generality", \.generality), ("locality", \.locality)]
        for (i, (name, value)) in metrics.enumerated() {
            let x0 = pad + Double(i) * panelW, y0 = 20.0, w = panelW - 30, h = H - 70
            out += "<text x=\"\(x0 + w / 2)\" y=\"14\" text-anchor=\"middle\">\(name)</text>\n"
            out += "<rect x=\"\(x0)\" y=\"\(y0)\" width=\"\(w)\" height=\"\(h)\" fill=\"none\" stroke=\"#999\"/>\n"
            for t in [0.0, 0.5, 1.0] {
                let y = y0 + h * (1 - t)
                out += "<text x=\"\(x0 - 4)\" y=\"\(y + 4)\" text-anchor=\"end\">\(t)</text>\n"
            }
            for n in ns {
                let x = x0 + w * (log10(Double(n)) - lo) / (hi - lo)
                out += "<text x=\"\(x)\" y=\"\(y0 + h + 14)\" text-anchor=\"middle\">\(n)</text>\n"
            }
            for method in Set(results.map(\.method)).sorted() {
                let pts = results.filter { $0.method == method }.sorted { $0.n < $1.n }.map { r -> String in
                    let x = x0 + w * (log10(Double(r.n)) - lo) / (hi - lo)
                    return String(format: "%.1f,%.1f", x, y0 + h * (1 - min(max(value(r), 0), 1)))
                }
                out += "<polyline fill=\"none\" stroke=\"\(colour(method))\" stroke-width=\"2\" points=\"\(pts.joined(separator: " "))\"/>\n"
            }
        }
        var lx = pad
        for method in Set(results.map(\.method)).sorted() {
            out += "<rect x=\"\(lx)\" y=\"\(H - 22)\" width=\"12\" height=\"12\" fill=\"\(colour(method))\"/><text x=\"\(lx + 16)\" y=\"\(H - 12)\">\(method)</text>\n"
            lx += 40 + 7 * Double(method.count)
        }
        out += "<text x=\"\(W - 10)\" y=\"\(H - 12)\" text-anchor=\"end\">N edits (log scale)</text>\n</svg>\n"
        return out
    }
}
