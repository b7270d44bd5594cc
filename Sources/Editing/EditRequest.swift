import Foundation

/// One fact edit: make `prompt` continue with `targetNew`. Rephrasings test generality; locality
/// pairs are facts the edit must leave alone.
public struct EditRequest: Sendable, Equatable, Codable {
    public var prompt: String
    public var targetNew: String
    public var subject: String?
    public var groundTruth: String?
    public var rephrases: [String]
    public var locality: [LocalityPair]
    public var caseId: String?

    public struct LocalityPair: Sendable, Equatable, Codable {
        public var prompt: String
        public var groundTruth: String
        public init(prompt: String, groundTruth: String) { self.prompt = prompt; self.groundTruth = groundTruth }
    }

    public init(prompt: String, targetNew: String, subject: String? = nil, groundTruth: String? = nil,
                rephrases: [String] = [], locality: [LocalityPair] = [], caseId: String? = nil) {
        self.prompt = prompt; self.targetNew = targetNew; self.subject = subject; self.groundTruth = groundTruth
        self.rephrases = rephrases; self.locality = locality; self.caseId = caseId
    }
}
