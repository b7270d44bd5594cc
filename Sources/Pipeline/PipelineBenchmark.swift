import Editing
import Foundation
import Logging
import Storage

/// `dafnet bench pipeline`: batches/s and edits/s end to end (file in the inbox → version committed,
/// evaluation written, file in done/) for a few batch sizes, with the share of time per stage. Each
/// batch size runs on a fresh inbox and store in `workDir`.
public enum PipelineBenchmark {
    public struct Row: Codable, Sendable {
        public var batchSize: Int
        public var batches: Int
        public var edits: Int
        public var committed: Int
        /// Wall time of the whole run (`watch --once` over the batches, model already loaded).
        public var seconds: Double
        public var batchesPerSecond: Double
        public var editsPerSecond: Double
        /// Seconds per stage (summed over the batches), and their share of the wall time; `other` is the rest.
        public var stageSeconds: [String: Double]
        public var stageShare: [String: Double]

        enum CodingKeys: String, CodingKey {
            case batchSize = "batch_size", batches, edits, committed, seconds, batchesPerSecond = "batches_per_second"
            case editsPerSecond = "edits_per_second", stageSeconds = "stage_seconds", stageShare = "stage_share"
        }
    }

    /// Runs `batches(size)` batches of each size in `sizes`, edits taken in order from `pool` (cycled).
    public static func run(editor: SequentialEditor, pool: [EditRequest], sizes: [Int], batches: (Int) -> Int,
                           resources: PipelineResources, settings: PipelineSettings, workDir: URL,
                           progress: (String) -> Void = { _ in }) throws -> [Row] {
        guard !pool.isEmpty else { throw PipelineError.invalidSetting("bench pipeline: the edit pool is empty") }
        var rows: [Row] = []
        var settings = settings
        settings.minimumFileAge = 0
        for size in sizes {
            let dir = workDir.appendingPathComponent("size-\(size)")
            try? FileManager.default.removeItem(at: dir)
            let inbox = try Inbox(dir.appendingPathComponent("inbox"))
            let store = try CheckpointStore(at: dir.appendingPathComponent("store"), create: true)
            let n = max(1, batches(size))
            var at = 0
            for b in 0..<n {
                var reqs: [EditRequest] = []
                for _ in 0..<size { reqs.append(pool[at % pool.count]); at += 1 }
                try EditBatch.encode(reqs).write(to: inbox.root.appendingPathComponent(String(format: "%06d.jsonl", b)))
            }
            var logger = Logger(label: "dafnet.bench") { _ in SwiftLogNoOpLogHandler() }
            logger.logLevel = .critical
            let processor = try BatchProcessor(inbox: inbox, store: store, editor: editor, resources: resources,
                                               settings: settings, logger: logger)
            let t0 = Date()
            let outcomes = try processor.runOnce()
            let wall = Date().timeIntervalSince(t0)
            let stages = outcomes.map(\.timings).reduce(StageTimes(), +)
            var secs = Dictionary(uniqueKeysWithValues: stages.byName)
            secs["other"] = max(0, wall - stages.total)
            let row = Row(batchSize: size, batches: n, edits: n * size, committed: outcomes.filter { $0.status == .committed }.count,
                          seconds: wall, batchesPerSecond: Double(n) / wall, editsPerSecond: Double(n * size) / wall,
                          stageSeconds: secs, stageShare: secs.mapValues { $0 / wall })
            progress(String(format: "batch size %d: %d batches in %.2f s (%.2f batches/s, %.1f edits/s)", size, n, wall,
                            row.batchesPerSecond, row.editsPerSecond))
            rows.append(row)
        }
        return rows
    }

    /// A Markdown table of the rows.
    public static func markdown(_ rows: [Row]) -> String {
        let stages = StageTimes.stageNames + ["other"]
        var s = "| batch size | batches | edits | batches/s | edits/s | " + stages.joined(separator: " | ") + " |\n"
        s += "|---:|---:|---:|---:|---:|" + stages.map { _ in "---:" }.joined(separator: "|") + "|\n"
        for r in rows {
            s += String(format: "| %d | %d | %d | %.2f | %.1f | ", r.batchSize, r.batches, r.edits, r.batchesPerSecond, r.editsPerSecond)
            s += stages.map { String(format: "%.1f %%", 100 * (r.stageShare[$0] ?? 0)) }.joined(separator: " | ") + " |\n"
        }
        return s
    }
}
