import Foundation
import Storage

/// One fact edit: make `prompt` continue with `targetNew`. Rephrasings test generality; locality
/// pairs are facts the edit must leave alone.
///
/// Encodes (and decodes) as one line of a batch in the flat CounterFact/EasyEdit layout:
/// `prompt`, `target_new`, `subject`, `ground_truth`, `rephrase_prompt` (a list), `locality` (a list of
/// `{prompt, ground_truth}`), `case_id`, and every field of `extra` beside them, so an edit log written
/// with `JSONEncoder` is itself a batch `EditBatch.parse` reads back to equal requests.
public struct EditRequest: Sendable, Equatable, Codable {
    public var prompt: String
    public var targetNew: String
    public var subject: String?
    public var groundTruth: String?
    public var rephrases: [String]
    public var locality: [LocalityPair]
    public var caseId: String?
    /// Fields of the batch line this type does not know (kept as parsed, written back beside the others).
    public var extra: [String: JSONValue]

    public struct LocalityPair: Sendable, Equatable, Codable {
        public var prompt: String
        public var groundTruth: String
        public init(prompt: String, groundTruth: String) { self.prompt = prompt; self.groundTruth = groundTruth }

        enum CodingKeys: String, CodingKey { case prompt, groundTruth = "ground_truth" }
    }

    public init(prompt: String, targetNew: String, subject: String? = nil, groundTruth: String? = nil,
                rephrases: [String] = [], locality: [LocalityPair] = [], caseId: String? = nil,
                extra: [String: JSONValue] = [:]) {
        self.prompt = prompt; self.targetNew = targetNew; self.subject = subject; self.groundTruth = groundTruth
        self.rephrases = rephrases; self.locality = locality; self.caseId = caseId; self.extra = extra
    }

    /// The batch-line names this type reads itself (aliases included); everything else goes to `extra`.
    public static let knownFields: Set<String> = [
        "prompt", "src", "target_new", "alt", "subject", "ground_truth", "rephrase_prompt", "rephrase",
        "locality", "locality_prompt", "loc", "locality_ground_truth", "loc_ans", "case_id",
    ]

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ s: String) { stringValue = s }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: Key.self)
        prompt = try c.decode(String.self, forKey: Key("prompt"))
        targetNew = try c.decode(String.self, forKey: Key("target_new"))
        subject = try c.decodeIfPresent(String.self, forKey: Key("subject"))
        groundTruth = try c.decodeIfPresent(String.self, forKey: Key("ground_truth"))
        rephrases = try c.decodeIfPresent([String].self, forKey: Key("rephrase_prompt")) ?? []
        locality = try c.decodeIfPresent([LocalityPair].self, forKey: Key("locality")) ?? []
        if let i = try? c.decodeIfPresent(Int.self, forKey: Key("case_id")) { caseId = String(i) }
        else { caseId = try c.decodeIfPresent(String.self, forKey: Key("case_id")) }
        extra = [:]
        for key in c.allKeys where !Self.knownFields.contains(key.stringValue) {
            extra[key.stringValue] = try c.decode(JSONValue.self, forKey: key)
        }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: Key.self)
        for (k, v) in extra where !Self.knownFields.contains(k) { try c.encode(v, forKey: Key(k)) }
        try c.encode(prompt, forKey: Key("prompt"))
        try c.encode(targetNew, forKey: Key("target_new"))
        try c.encodeIfPresent(subject, forKey: Key("subject"))
        try c.encodeIfPresent(groundTruth, forKey: Key("ground_truth"))
        if !rephrases.isEmpty { try c.encode(rephrases, forKey: Key("rephrase_prompt")) }
        if !locality.isEmpty { try c.encode(locality, forKey: Key("locality")) }
        try c.encodeIfPresent(caseId, forKey: Key("case_id"))
    }
}
