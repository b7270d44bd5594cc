import Editing
import Foundation
import Storage

/// The canary facts: a fixed small set of locality probes checked after every batch.
public enum Canaries {
    /// Reads probes from JSON Lines. Each line gives one probe: `locality_prompt` + `locality_ground_truth`
    /// when present (a world's facts file: the fact's neighbour), else `prompt` + `ground_truth`. Lines
    /// with a `split` field other than `heldout` are skipped, so the world's `facts.jsonl` gives the
    /// neighbours of its held-out facts. The first `limit` probes are kept.
    public static func load(_ url: URL, limit: Int = 20) throws -> [EditRequest.LocalityPair] {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw PipelineError.invalidSetting("canary file \(url.path): cannot read it")
        }
        var out: [EditRequest.LocalityPair] = []
        var lineNo = 0
        for raw in data.split(separator: UInt8(ascii: "\n")) where out.count < limit {
            lineNo += 1
            let line = Data(raw)
            if line.allSatisfy({ $0 == 32 || $0 == 9 || $0 == 13 }) { continue }
            guard let obj = try? JSONValue(parsing: line), let o = obj.objectValue else {
                throw PipelineError.invalidSetting("canary file \(url.path):\(lineNo): not a JSON object")
            }
            if let split = o["split"]?.stringValue, split != "heldout" { continue }
            let pair: (String?, String?)
            if o["locality_prompt"] != nil {
                pair = (o["locality_prompt"]?.stringValue, o["locality_ground_truth"]?.stringValue)
            } else {
                pair = (o["prompt"]?.stringValue, o["ground_truth"]?.stringValue)
            }
            guard let p = pair.0, let g = pair.1, !p.isEmpty, !g.isEmpty else {
                throw PipelineError.invalidSetting("canary file \(url.path):\(lineNo): needs prompt and ground_truth strings")
            }
            out.append(.init(prompt: p, groundTruth: g))
        }
        return out
    }
}
