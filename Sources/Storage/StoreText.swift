import Foundation

/// Plain-text and JSON renderings of store results, shared by the CLI commands.
public enum StoreText {
    /// Pretty JSON with sorted, snake_case keys.
    public static func json<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.keyEncodingStrategy = .convertToSnakeCase
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    static func megabytes(_ bytes: Int?) -> String {
        guard let bytes else { return "-" }
        return String(format: "%.2f", Double(bytes) / 1e6)
    }

    static func pad(_ s: String, _ width: Int) -> String {
        s.count >= width ? s : s + String(repeating: " ", count: width - s.count)
    }

    static func shape(_ s: [Int]?) -> String {
        guard let s else { return "-" }
        return "[" + s.map(String.init).joined(separator: ",") + "]"
    }

    /// `checkpoints list`.
    public static func list(_ rows: [VersionSummary]) -> String {
        guard !rows.isEmpty else { return "no versions" }
        var lines = ["  version  parent  created                   tensors  raw MB  stored MB  new MB  replay  state         batch"]
        for r in rows {
            if let problem = r.problem {
                lines.append("\(r.isHead ? "*" : " ") \(pad(String(r.version), 7))  UNREADABLE: \(problem)")
                continue
            }
            lines.append("\(r.isHead ? "*" : " ") \(pad(String(r.version), 7))  \(pad(r.parent.map(String.init) ?? "-", 6))  "
                + "\(pad(String((r.created ?? "-").prefix(24)), 24))  \(pad(String(r.tensors ?? 0), 7))  "
                + "\(pad(megabytes(r.rawBytes), 6))  \(pad(megabytes(r.storedBytes), 9))  \(pad(megabytes(r.newBytes), 6))  "
                + "\(pad(r.replayEdits.map(String.init) ?? "-", 6))  "
                + "\(pad(String((r.stateSHA256 ?? "-").prefix(12)), 12))  \(r.batch ?? "-")")
        }
        lines.append("(* = HEAD; replay: the edits applied again to rebuild the rest of the state, - for a whole one)")
        return lines.joined(separator: "\n")
    }

    /// `checkpoints show`.
    public static func show(_ m: Manifest, isHead: Bool) -> String {
        var lines = [
            "version      \(m.version)\(isHead ? " (HEAD)" : "")",
            "parent       \(m.parent.map(String.init) ?? "-")",
            "created      \(m.created)",
            "state        \(m.stateSHA256)",
            "base model   \(m.baseModelSHA256 ?? "-")",
            "editor       \(m.editorSHA256 ?? "-")",
            "batch        \(m.batch.map { "\($0.name) (\($0.sha256))" } ?? "-")",
        ]
        if let origin = m.origin { lines.append("imported     from \(origin.archive), version \(origin.version) there") }
        if let info = m.info { lines.append("info         \(info)") }
        if let r = m.replayEdits {
            lines.append("replay       \(r) edits: the rest of the state is rebuilt by applying them again on the nearest ancestor holding a whole state")
        }
        if let d = m.derived {
            lines.append("derived      \(d.joined(separator: ", ")): not stored, computed from the rest by the editor that made the version")
        }
        if let n = m.blasThreads { lines.append("blas threads \(n) (the batch was applied, and is replayed, at this OpenBLAS thread count)") }
        lines.append("tensors      \(m.tensors.count)")
        for t in m.tensors {
            lines.append("  \(pad(t.name, 48)) \(pad(shape(t.shape), 14)) \(t.dtype)  \(t.bytes) B → \(t.storedBytes) B  \(t.parts.count == 1 ? String(t.parts[0].blob.prefix(12)) : "\(t.parts.count) parts, last \(t.parts.last!.blob.prefix(12))")")
        }
        if !m.files.isEmpty {
            lines.append("files        \(m.files.count)")
            for f in m.files { lines.append("  \(pad(f.name, 48)) \(f.bytes) B → \(f.storedBytes) B  \(f.blob.prefix(12))") }
        }
        return lines.joined(separator: "\n")
    }

    /// `checkpoints diff`.
    public static func diff(_ rows: [TensorDifference], from a: Int, to b: Int) -> String {
        var lines = ["diff \(a) → \(b)", "  \(pad("tensor", 48)) \(pad("status", 9)) \(pad("shape", 14)) max |Δ|       ‖Δ‖          ‖a‖          ‖b‖"]
        func num(_ x: Double?) -> String { pad(x.map { String(format: "%.4e", $0) } ?? "-", 12) }
        for r in rows {
            let shapeText = r.shapeA == r.shapeB || r.shapeA == nil || r.shapeB == nil
                ? shape(r.shapeB ?? r.shapeA) : shape(r.shapeA) + "→" + shape(r.shapeB)
            lines.append("  \(pad(r.name, 48)) \(pad(r.status.rawValue, 9)) \(pad(shapeText, 14)) "
                + "\(num(r.maxAbsDifference)) \(num(r.differenceNorm)) \(num(r.normA)) \(num(r.normB))")
        }
        let changed = rows.filter { $0.status != .unchanged }.count
        lines.append("\(changed) of \(rows.count) tensors differ")
        return lines.joined(separator: "\n")
    }

    /// `checkpoints verify`.
    public static func verify(_ r: VerificationReport) -> String {
        var lines: [String] = []
        for p in r.problems { lines.append("PROBLEM: \(p)") }
        for w in r.warnings { lines.append("warning: \(w)") }
        lines.append("\(r.checkedVersions) versions, \(r.checkedBlobs) blobs checked: "
            + (r.isClean ? "OK" : "\(r.problems.count) problem(s)"))
        return lines.joined(separator: "\n")
    }

    /// `checkpoints gc`.
    public static func gc(_ r: GCReport) -> String {
        let removed = r.removedVersions.isEmpty ? "no versions" : "versions " + r.removedVersions.map(String.init).joined(separator: ", ")
        return "removed \(removed) and \(r.removedBlobs.count) unreferenced blob(s), freed \(r.freedBytes) bytes; "
            + "kept versions \(r.keptVersions.map(String.init).joined(separator: ", "))"
    }

    /// `checkpoints history`.
    public static func history(_ records: [HistoryRecord]) -> String {
        guard !records.isEmpty else { return "no history" }
        return records.map { r in
            var line = "\(r.time)  \(pad(r.op.rawValue, 8))  \(r.from.map(String.init) ?? "-") → \(r.version.map(String.init) ?? "-")"
            if let s = r.source { line += "  \(s)" }
            if let v = r.versions, !v.isEmpty { line += "  [\(v.map(String.init).joined(separator: ", "))]" }
            return line
        }.joined(separator: "\n")
    }
}
