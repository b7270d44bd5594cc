import Foundation
import Storage
import Logging

/// A swift-log handler that writes one line per event to standard error: either
/// `2025-01-01T12:00:00.000Z info dafnet.pipeline: batch committed batch=0001.jsonl version=3 …`
/// (`text`) or one JSON object per line (`json`: time, level, label, message and the metadata keys).
public struct StructuredLogHandler: LogHandler {
    public enum Format: String, Sendable { case text, json }

    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public let label: String
    public let format: Format
    let sink: @Sendable (String) -> Void

    public init(label: String, level: Logger.Level = .info, format: Format = .text,
                sink: @escaping @Sendable (String) -> Void = { line in FileHandle.standardError.write(Data((line + "\n").utf8)) }) {
        self.label = label; self.logLevel = level; self.format = format; self.sink = sink
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        write(level: event.level, message: event.message, metadata: event.metadata)
    }

    func write(level: Logger.Level, message: Logger.Message, metadata explicit: Logger.Metadata?) {
        var all = metadata
        if let explicit { all.merge(explicit) { $1 } }
        let time = Timestamp.now()
        switch format {
        case .text:
            var s = "\(time) \(level) \(label): \(message)"
            for k in all.keys.sorted() {
                let v = "\(all[k]!)"
                s += " \(k)=" + (v.contains(" ") || v.isEmpty ? "\"\(v.replacingOccurrences(of: "\"", with: "\\\""))\"" : v)
            }
            sink(s)
        case .json:
            var o: [String: String] = ["time": time, "level": "\(level)", "label": label, "message": "\(message)"]
            for (k, v) in all where o[k] == nil { o[k] = "\(v)" }
            let e = JSONEncoder()
            e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            if let d = try? e.encode(o) { sink(String(decoding: d, as: UTF8.self)) }
        }
    }
}
