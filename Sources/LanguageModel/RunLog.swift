import Foundation

/// A training run's log file: timestamped lines appended (created on first write).
public struct RunLog: Sendable {
    public let url: URL

    public init(url: URL) { self.url = url }

    public func write(_ line: String) {
        let stamped = Data((ISO8601DateFormatter().string(from: Date()) + " " + line + "\n").utf8)
        if let h = try? FileHandle(forWritingTo: url) {
            h.seekToEndOfFile()
            h.write(stamped)
            try? h.close()
        } else {
            try? stamped.write(to: url)
        }
    }
}
