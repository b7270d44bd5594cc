import Editing
import Foundation
import Storage

/// Every edit applied on a line of versions, kept in each version as JSON Lines files
/// `edit_log.000000.jsonl`, `edit_log.000001.jsonl`, … of `chunkSize` edits each (the batch layout, so a
/// chunk is itself a valid batch). Full chunks never change, so the store keeps one blob for each however
/// many versions share it; a commit writes only the last chunk anew.
public struct EditLog: Sendable {
    public static let filePrefix = "edit_log."
    public static let fileSuffix = ".jsonl"

    public let chunkSize: Int
    /// Chunk contents (whole lines).
    public private(set) var chunks: [Data] = []
    /// Lines per chunk.
    public private(set) var counts: [Int] = []

    public var count: Int { counts.reduce(0, +) }
    /// Each edit's prompt, in order, and the index of the last edit of each prompt: an edit is live while no
    /// later edit has its prompt (a later one supersedes it: the same fact with another target).
    private var prompts: [String] = []
    private var lastOfPrompt: [String: Int] = [:]

    public init(chunkSize: Int = 1000) { self.chunkSize = max(1, chunkSize) }

    private struct PromptOnly: Decodable { let prompt: String }

    private mutating func note(prompt: String) {
        lastOfPrompt[prompt] = prompts.count
        prompts.append(prompt)
    }

    /// Whether the edit at `index` is not superseded by a later one.
    private func isLive(_ index: Int) -> Bool { lastOfPrompt[prompts[index]] == index }

    public static func fileName(_ index: Int) -> String { filePrefix + String(format: "%06d", index) + fileSuffix }

    /// A stored version's log files, in order.
    private static func logFiles(_ files: [FileEntry]) -> [FileEntry] {
        files.filter { $0.name.hasPrefix(filePrefix) && $0.name.hasSuffix(fileSuffix) }.sorted { $0.name < $1.name }
    }

    /// How many edits a stored version's log holds (its lines counted, none decoded).
    static func count(of version: VersionTensorSource) throws -> Int {
        try count(version.manifest.files, of: version.manifest.version, in: version.store)
    }

    /// The same for a version known by its link in the chain.
    static func count(of link: ManifestLink, in store: CheckpointStore) throws -> Int {
        try count(link.files, of: link.version, in: store)
    }

    private static func count(_ files: [FileEntry], of version: Int, in store: CheckpointStore) throws -> Int {
        try logFiles(files).reduce(0) { n, entry in
            n + (try store.decodeFile(entry, version: version)).withUnsafeBytes { raw in
                raw.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) }
            }
        }
    }

    /// The log of a stored version (empty when it has none).
    public static func load(from store: CheckpointStore, version: Int, chunkSize: Int = 1000) throws -> EditLog {
        try load(from: try store.source(.number(version)), chunkSize: chunkSize)
    }

    /// The same for a version whose manifest is already read.
    public static func load(from version: VersionTensorSource, chunkSize: Int = 1000) throws -> EditLog {
        var log = EditLog(chunkSize: chunkSize)
        let decoder = JSONDecoder()
        for entry in logFiles(version.manifest.files) {
            let data = try version.store.decodeFile(entry, version: version.manifest.version)
            log.chunks.append(data)
            let lines = data.split(separator: UInt8(ascii: "\n"))
            log.counts.append(lines.count)
            for line in lines { log.note(prompt: try decoder.decode(PromptOnly.self, from: Data(line)).prompt) }
        }
        return log
    }

    public mutating func append(_ requests: [EditRequest]) throws {
        for r in requests {
            if chunks.isEmpty || counts[counts.count - 1] >= chunkSize {
                chunks.append(Data())
                counts.append(0)
            }
            var line = try EditBatch.line(r)
            line.append(UInt8(ascii: "\n"))
            chunks[chunks.count - 1].append(line)
            counts[counts.count - 1] += 1
            note(prompt: r.prompt)
        }
    }

    /// The live edits that `requests` supersede (the last logged edit of each of their prompts), in log order,
    /// each with its index in the log.
    public func superseded(by requests: [EditRequest]) throws -> [PriorEdit] {
        let indices = Set(requests.compactMap { lastOfPrompt[$0.prompt] }).sorted()
        return zip(try lines(indices), indices).map { PriorEdit($0, ordinal: $1) }
    }

    /// The files to commit with a version.
    public var files: [String: Data] {
        Dictionary(uniqueKeysWithValues: chunks.enumerated().map { (Self.fileName($0.offset), $0.element) })
    }

    /// Up to `k` live edits spread evenly over the log's live edits (the ⌊i·n/k⌋-th of n), in order, leaving
    /// out those whose prompt is in `excluding` (edits about to be superseded).
    public func sample(_ k: Int, excluding: Set<String> = []) throws -> [EditRequest] {
        let live = prompts.indices.filter { isLive($0) && !excluding.contains(prompts[$0]) }
        let n = live.count
        guard n > 0, k > 0 else { return [] }
        return try lines(n <= k ? live : (0..<k).map { live[$0 * n / k] })
    }

    /// The edits at `wanted` (ascending indices).
    private func lines(_ wanted: [Int]) throws -> [EditRequest] {
        var out: [EditRequest] = []
        var base = 0
        var w = 0
        let decoder = JSONDecoder()
        for (ci, chunk) in chunks.enumerated() {
            let end = base + counts[ci]
            if w < wanted.count && wanted[w] < end {
                let rows = chunk.split(separator: UInt8(ascii: "\n"))
                while w < wanted.count && wanted[w] < end {
                    out.append(try decoder.decode(EditRequest.self, from: Data(rows[wanted[w] - base])))
                    w += 1
                }
            }
            base = end
        }
        return out
    }

    /// Every edit of the log, in order (superseded ones included).
    public func all() throws -> [EditRequest] { try edits(0..<count) }

    /// The edits at positions `range` of the log, in order (only those lines decoded).
    public func edits(_ range: Range<Int>) throws -> [EditRequest] { try lines(Array(range)) }

    /// The edits a version holds, batch by batch: for each version of its lineage (root first), the
    /// batch that made it and the edits it added (the difference of its log and its parent's).
    public static func lineage(of version: Int, in store: CheckpointStore) throws -> [(version: Int, batch: String?, edits: [EditRequest])] {
        var chain: [Manifest] = []
        var v: Int? = version
        while let at = v, let m = try? store.manifest(at) {
            chain.append(m)
            v = m.parent
        }
        let edits = try load(from: store, version: version).all()
        var out: [(version: Int, batch: String?, edits: [EditRequest])] = []
        var start = 0
        for m in chain.reversed() {
            let end = try count(of: VersionTensorSource(store: store, manifest: m))
            out.append((m.version, m.batch?.name, Array(edits[min(start, edits.count)..<min(end, edits.count)])))
            start = end
        }
        return out
    }
}
