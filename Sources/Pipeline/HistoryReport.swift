import Foundation
import Storage

/// `dafnet report`: the batches of `STORE/evaluations/batches.jsonl` as one self-contained HTML page
/// (inline CSS and SVG, no scripts, nothing fetched): metrics across versions, perplexity across
/// versions, and a table of every batch.
public enum HistoryReport {
    /// Reads the batch lines of a store (an unreadable line is skipped), and for versions the log does
    /// not know (restored from an archive, which carries each version's own evaluation file) the line
    /// their evaluation file gives; in time order.
    public static func load(_ store: CheckpointStore) throws -> [HistoryLine] {
        let decoder = PipelineJSON.decoder
        var lines = try store.lines(of: .batches).compactMap { try? decoder.decode(HistoryLine.self, from: $0) }
        let known = Set(lines.compactMap(\.version))
        for v in try store.versions() where !known.contains(v) {
            let dir = store.evaluationsDirectory(for: v)
            let suffix = String(format: ".v%04d.json", v)
            guard let name = (try? FileManager.default.contentsOfDirectory(atPath: dir.path))?.sorted().first(where: { $0.hasSuffix(suffix) }),
                  let data = try? Data(contentsOf: dir.appendingPathComponent(name)),
                  var r = try? decoder.decode(BatchReport.self, from: data) else { continue }
            r.version = v
            lines.append(r.historyLine)
        }
        return lines.enumerated().sorted { ($0.element.time, $0.offset) < ($1.element.time, $1.offset) }.map(\.element)
    }

    /// What the page shows besides the batches: HEAD, its moves other than commits, the failed batches.
    public struct Context: Sendable {
        public var head: Int?
        public var moves: [HistoryRecord] = []
        public var failed: [JournalEntry] = []
        public init(head: Int? = nil, moves: [HistoryRecord] = [], failed: [JournalEntry] = []) {
            self.head = head; self.moves = moves; self.failed = failed
        }

        /// HEAD, the rollbacks, repairs and imports of the store's history, and the journal's rejected
        /// and guarded batches.
        public static func of(_ store: CheckpointStore) throws -> Context {
            let failed = try store.lines(of: .journal).compactMap { try? JSONDecoder().decode(JournalEntry.self, from: $0) }
                .filter { [.rejected, .guarded].contains($0.status) }
            return Context(head: try? store.head(), moves: try store.history().filter { [.rollback, .repair, .import].contains($0.op) },
                           failed: failed)
        }
    }

    /// The same for the store folder at `store`.
    public static func load(store: URL) throws -> [HistoryLine] { try load(CheckpointStore(at: store)) }

    struct Series {
        var name: String
        var color: String
        var dashed = false
        var values: [Double?]
    }

    public static func html(_ lines: [HistoryLine], context: Context = Context(), title: String = "dafnet: batches and versions") -> String {
        let committed = lines.filter { $0.status == .committed }
        let labels = committed.map { "v\($0.version ?? 0)" }
        var body = ""
        body += "<h1>\(escape(title))</h1>\n"
        let guarded = lines.filter { $0.status == .guarded }.count
        let edits = committed.reduce(0) { $0 + $1.edits }
        body += "<p class=\"meta\">\(committed.count) committed batch\(committed.count == 1 ? "" : "es") (\(edits) edits)"
        if guarded > 0 { body += ", \(guarded) refused by the collapse guard" }
        if let last = lines.last { body += "; last batch \(escape(last.time))" }
        body += "; HEAD: " + (context.head.map { "version \($0)" } ?? "the unedited model") + ".</p>\n"
        if committed.isEmpty {
            body += "<p>No committed batch yet.</p>\n"
        } else {
            body += "<h2>Edit metrics across versions</h2>\n"
            body += chart(labels: labels, series: [
                Series(name: "reliability", color: "#1f77b4", values: committed.map(\.reliability)),
                Series(name: "generality", color: "#2ca02c", values: committed.map(\.generality)),
                Series(name: "locality", color: "#ff7f0e", values: committed.map(\.locality)),
                Series(name: "retention", color: "#9467bd", values: committed.map(\.retention)),
                Series(name: "canary locality", color: "#8c564b", values: committed.map(\.canaryLocality)),
            ], yRange: (0, 1))
            let ppl = committed.map(\.perplexityAfter)
            if ppl.contains(where: { $0 != nil }) {
                body += "<h2>Held-out perplexity across versions</h2>\n"
                let all = (ppl + committed.map(\.perplexityUnedited)).compactMap { $0 }.filter(\.isFinite)
                let lo = (all.min() ?? 0), hi = (all.max() ?? 1)
                let pad = max((hi - lo) * 0.1, hi * 0.01, 1e-6)
                body += chart(labels: labels, series: [
                    Series(name: "after the batch", color: "#d62728", values: ppl),
                    Series(name: "unedited model", color: "#7f7f7f", dashed: true, values: committed.map(\.perplexityUnedited)),
                ], yRange: (max(0, lo - pad), hi + pad))
            }
        }
        body += watchTable(committed)
        body += "<h2>Batches</h2>\n<table>\n<tr><th>time</th><th>batch</th><th>status</th><th>version</th><th>parent</th><th>edits</th>"
        body += "<th>total edits</th><th>reliability</th><th>generality</th><th>locality</th><th>retention</th><th>canary</th>"
        body += "<th>perplexity before → after</th><th>fluency</th><th>seconds</th></tr>\n"
        for l in lines {
            let isHead = l.status == .committed && l.version != nil && l.version == context.head
            let cls = l.status == .committed ? (isHead ? " class=\"head\"" : "") : " class=\"\(escape(l.status.rawValue))\""
            let batch = l.evaluation.map {
                "<a href=\"\(escape(pageName(forEvaluation: $0)))\">\(escape(l.batch))</a> <a class=\"json\" href=\"\(escape($0))\">json</a>"
            } ?? escape(l.batch)
            body += "<tr\(cls)><td>\(escape(l.time))</td><td>\(batch)</td><td>\(escape(l.status.rawValue))\(isHead ? " (HEAD)" : "")</td>"
            body += "<td>\(l.version.map(String.init) ?? "–")</td><td>\(l.parent.map(String.init) ?? "–")</td>"
            body += "<td>\(l.edits)</td><td>\(l.totalEdits)</td><td>\(num(l.reliability))</td><td>\(num(l.generality))</td>"
            body += "<td>\(num(l.locality))</td><td>\(num(l.retention))</td><td>\(num(l.canaryLocality))</td>"
            body += "<td>\(num(l.perplexityBefore, "%.2f")) → \(num(l.perplexityAfter, "%.2f"))</td><td>\(num(l.fluency, "%.2f"))</td>"
            body += "<td>\(num(l.seconds, "%.2f"))</td></tr>\n"
        }
        body += "</table>\n"
        if !context.failed.isEmpty {
            body += "<h2>Failed batches</h2>\n<table class=\"failed\">\n<tr><th>time</th><th>batch</th><th>status</th><th>HEAD then</th><th>reason</th></tr>\n"
            for f in context.failed {
                body += "<tr><td>\(escape(f.time))</td><td>\(escape(f.batch))</td><td>\(escape(f.status.rawValue))</td>"
                body += "<td>\(f.version.map(String.init) ?? "–")</td><td class=\"reason\">\(escape(f.note ?? ""))</td></tr>\n"
            }
            body += "</table>\n"
        }
        if !context.moves.isEmpty {
            body += "<h2>Moves of HEAD besides commits</h2>\n<table class=\"moves\">\n<tr><th>time</th><th>operation</th><th>from</th><th>to</th></tr>\n"
            for m in context.moves {
                body += "<tr><td>\(escape(m.time))</td><td>\(escape(m.op.rawValue))</td><td>\(m.from.map(String.init) ?? "–")</td>"
                body += "<td>\(m.version.map(String.init) ?? "base")</td></tr>\n"
            }
            body += "</table>\n"
        }
        return page(title: title, body: body)
    }

    /// A self-contained page: inline CSS, no scripts.
    static func page(title: String, body: String) -> String {
        """
        <!DOCTYPE html>
        <html lang="en"><head><meta charset="utf-8"><title>\(escape(title))</title>
        <style>
        body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em;color:#222;max-width:1400px}
        h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}.meta{color:#555}
        table{border-collapse:collapse;font-size:.8em}td:first-child{white-space:nowrap}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
        td:nth-child(2),th:nth-child(2),td:nth-child(1),td:nth-child(3){text-align:left}td.text,th.text{text-align:left}a.json{font-size:.85em;color:#777}
        tr.guarded{background:#fde8e8}td.lost{background:#fde8e8}tr.head{font-weight:600;background:#eef6ff}td.reason{text-align:left}td.holds{color:#2a7}svg{background:#fff;border:1px solid #ddd}
        svg text{font-size:11px;fill:#333}
        </style></head><body>
        \(body)</body></html>

        """
    }

    /// The page of a batch beside its evaluation file: `NAME.vNNNN.html` for `NAME.vNNNN.json`.
    public static func pageName(forEvaluation file: String) -> String {
        (file.hasSuffix(".json") ? String(file.dropLast(5)) : file) + ".html"
    }

    /// Writes the page of every committed batch whose evaluation file is in the store's `evaluations/`
    /// (skipping pages already there unless `overwrite`), through the store. Returns the pages written.
    @discardableResult
    public static func writeBatchPages(_ store: CheckpointStore, lines: [HistoryLine], overwrite: Bool = false) throws -> [String] {
        var written: [String] = []
        for l in lines where l.status == .committed {
            guard let file = l.evaluation else { continue }
            let page = pageName(forEvaluation: file)
            let folder = store.evaluationsFolder
            if !overwrite && FileUtil.exists(folder.appendingPathComponent(page).path) { continue }
            guard let data = try? Data(contentsOf: folder.appendingPathComponent(file)),
                  let report = try? PipelineJSON.decoder.decode(BatchReport.self, from: data) else { continue }
            try store.writeEvaluationsFile(Data(batchPage(report, evaluationFile: file).utf8), named: page)
            written.append(page)
        }
        return written
    }

    /// One batch: its means, each edit with its scores and its greedy answers before (unedited model) and
    /// after, the fluency check's continuations, the retention sample and the watch list, linked to the
    /// evaluation file it is made from.
    public static func batchPage(_ r: BatchReport, evaluationFile: String) -> String {
        var b = "<h1>\(escape(r.batch))</h1>\n<p class=\"meta\">version \(r.version.map(String.init) ?? "–") on \(r.parent.map(String.init) ?? "the unedited model") · "
        b += "\(escape(r.time)) · \(r.edits) edits, \(r.totalEdits) in the state · <a href=\"report.html\">all batches</a> · "
        b += "<a href=\"\(escape(evaluationFile))\">\(escape(evaluationFile))</a></p>\n"
        b += "<table class=\"means\"><tr><th>reliability</th><th>generality</th><th>locality</th><th>retention</th><th>canary locality</th>"
        b += "<th>perplexity before → after</th><th>fluency before → after</th><th>guard</th></tr>\n"
        b += "<tr><td>\(num(r.reliability))</td><td>\(num(r.generality))</td><td>\(num(r.locality))</td><td>\(num(r.retention?.after))</td>"
        b += "<td>\(num(r.canary.locality))</td><td>\(num(r.perplexity?.before, "%.2f")) → \(num(r.perplexity?.after, "%.2f"))</td>"
        b += "<td>\(num(r.fluency?.before, "%.2f")) → \(num(r.fluency?.after, "%.2f"))</td><td>\(r.guardResult.passed ? "passed" : "refused")</td></tr></table>\n"
        b += "<h2>Edits</h2>\n<table class=\"edits\">\n<tr><th>#</th><th class=\"text\">prompt</th><th class=\"text\">target</th><th>reliability</th>"
        b += "<th>generality</th><th>locality</th><th class=\"text\">answer before</th><th class=\"text\">answer after</th>"
        b += "<th>fluency before → after</th><th class=\"text\">continuation after</th></tr>\n"
        for (i, e) in r.perEdit.enumerated() {
            let cls = e.reliability >= 1 ? "" : " class=\"lost\""
            b += "<tr><td>\(i + 1)</td><td class=\"text\">\(escape(e.prompt))</td><td class=\"text\">\(escape(e.targetNew))</td>"
            b += "<td\(cls)>\(num(e.reliability, "%.2f"))</td><td>\(num(e.generality, "%.2f"))</td><td>\(num(e.locality, "%.2f"))</td>"
            b += "<td class=\"text\">\(escape(e.answerBefore ?? "–"))</td><td class=\"text\">\(escape(e.answerAfter ?? "–"))</td>"
            let fluency = e.fluencyAfter == nil ? "–" : "\(num(e.fluencyBefore, "%.2f")) → \(num(e.fluencyAfter, "%.2f"))"
            b += "<td>\(fluency)</td><td class=\"text\">\(escape(e.continuationAfter ?? ""))</td></tr>\n"
        }
        b += "</table>\n"
        if let ret = r.retention, let kept = ret.perEdit, !kept.isEmpty {
            b += "<h2>Earlier edits (retention sample: \(ret.sampled) of \(ret.earlierEdits))</h2>\n" + factTable(kept)
        }
        if let watched = r.watchList, !watched.isEmpty { b += "<h2>Watch list</h2>\n" + factTable(watched) }
        return page(title: r.batch, body: b)
    }

    static func factTable(_ facts: [FactScore]) -> String {
        var out = "<table class=\"facts\"><tr><th class=\"text\">prompt</th><th class=\"text\">target</th><th>before</th><th>after</th></tr>\n"
        for f in facts {
            out += "<tr><td class=\"text\">\(escape(f.prompt))</td><td class=\"text\">\(escape(f.targetNew))</td><td>\(num(f.before, "%.2f"))</td>"
            out += "<td\(f.holds ? " class=\"holds\"" : " class=\"lost\"")>\(num(f.after, "%.2f"))</td></tr>\n"
        }
        return out + "</table>\n"
    }

    /// The watch list's facts over versions: one row per fact, one column per committed batch, the
    /// score after it (✓ when every answer token holds).
    static func watchTable(_ committed: [HistoryLine]) -> String {
        var facts: [String] = []
        var seen = Set<String>()
        for l in committed { for f in l.watch ?? [] where seen.insert(f.prompt + "\u{0}" + f.targetNew).inserted { facts.append(f.prompt + "\u{0}" + f.targetNew) } }
        guard !facts.isEmpty else { return "" }
        var out = "<h2>Watch list across versions</h2>\n<table class=\"watch\">\n<tr><th>fact</th>"
        for l in committed { out += "<th>v\(l.version ?? 0)</th>" }
        out += "</tr>\n"
        for key in facts {
            let parts = key.components(separatedBy: "\u{0}")
            out += "<tr><td>\(escape(parts[0])) → \(escape(parts[1]))</td>"
            for l in committed {
                if let f = l.watch?.first(where: { $0.prompt == parts[0] && $0.targetNew == parts[1] }) {
                    out += f.holds ? "<td class=\"holds\">✓</td>" : "<td class=\"lost\">\(num(f.after, "%.2f"))</td>"
                } else {
                    out += "<td>–</td>"
                }
            }
            out += "</tr>\n"
        }
        return out + "</table>\n"
    }

    /// A line chart with one x position per version, a y grid, and a legend.
    static func chart(labels: [String], series: [Series], yRange: (Double, Double)) -> String {
        let w = 900.0, h = 300.0, left = 50.0, right = 160.0, top = 15.0, bottom = 35.0
        let pw = w - left - right, ph = h - top - bottom
        let n = labels.count
        func x(_ i: Int) -> Double { n <= 1 ? left + pw / 2 : left + pw * Double(i) / Double(n - 1) }
        func y(_ v: Double) -> Double {
            let (lo, hi) = yRange
            let c = min(max(v, lo), hi)
            return top + ph * (1 - (c - lo) / max(hi - lo, 1e-12))
        }
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(h))\" viewBox=\"0 0 \(Int(w)) \(Int(h))\">\n"
        let (ticks, decimals) = niceTicks(yRange.0, yRange.1)
        for v in ticks {
            let yy = y(v)
            s += "<line x1=\"\(f(left))\" y1=\"\(f(yy))\" x2=\"\(f(left + pw))\" y2=\"\(f(yy))\" stroke=\"#eee\"/>"
            s += "<text class=\"ytick\" x=\"\(f(left - 6))\" y=\"\(f(yy + 4))\" text-anchor=\"end\">\(String(format: "%.\(decimals)f", v))</text>\n"
        }
        s += "<line x1=\"\(f(left))\" y1=\"\(f(top + ph))\" x2=\"\(f(left + pw))\" y2=\"\(f(top + ph))\" stroke=\"#888\"/>\n"
        let step = max(1, Int((Double(n) / 15).rounded(.up)))
        for (i, l) in labels.enumerated() where i % step == 0 || i == n - 1 {
            s += "<text x=\"\(f(x(i)))\" y=\"\(f(top + ph + 16))\" text-anchor=\"middle\">\(escape(l))</text>\n"
        }
        s += "<text x=\"\(f(left + pw / 2))\" y=\"\(f(h - 4))\" text-anchor=\"middle\">version</text>\n"
        for (k, se) in series.enumerated() {
            let pts = se.values.enumerated().compactMap { i, v in v.flatMap { $0.isFinite ? (x(i), y($0)) : nil } }
            let dash = se.dashed ? " stroke-dasharray=\"5,4\"" : ""
            if pts.count > 1 {
                let d = pts.map { "\(f($0.0)),\(f($0.1))" }.joined(separator: " ")
                s += "<polyline fill=\"none\" stroke=\"\(se.color)\" stroke-width=\"2\"\(dash) points=\"\(d)\"/>\n"
            }
            if n <= 60 || pts.count == 1 {
                for p in pts { s += "<circle cx=\"\(f(p.0))\" cy=\"\(f(p.1))\" r=\"3\" fill=\"\(se.color)\"/>" }
                s += "\n"
            }
            let ly = top + 14 + Double(k) * 18
            s += "<line x1=\"\(f(w - right + 12))\" y1=\"\(f(ly - 4))\" x2=\"\(f(w - right + 32))\" y2=\"\(f(ly - 4))\" stroke=\"\(se.color)\" stroke-width=\"2\"\(dash)/>"
            s += "<text x=\"\(f(w - right + 38))\" y=\"\(f(ly))\">\(escape(se.name))</text>\n"
        }
        s += "</svg>\n"
        return s
    }

    static func f(_ x: Double) -> String { String(format: "%.1f", x) }

    /// Round tick values (steps of 1, 2 or 5 × 10^k, four to ten of them) inside [lo, hi], and the
    /// decimals that print each exactly: a label always names the value at its height.
    static func niceTicks(_ lo: Double, _ hi: Double) -> (values: [Double], decimals: Int) {
        let span = max(hi - lo, 1e-12)
        let raw = span / 5
        let p = pow(10, floor(log10(raw)))
        let step = [1.0, 2, 5, 10].map { $0 * p }.first { span / $0 <= 6 } ?? 10 * p
        let first = (lo / step).rounded(.up) * step
        var out: [Double] = []
        var v = first
        while v <= hi + step * 1e-9 { out.append(abs(v) < step * 1e-9 ? 0 : v); v += step }
        return (out, max(0, Int(-floor(log10(step) + 1e-9))))
    }

    static func num(_ x: Double?, _ format: String = "%.3f") -> String {
        guard let x else { return "–" }
        return x.isFinite ? String(format: format, x) : "\(x)"
    }

    static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.append(c)
            }
        }
        return out
    }
}
