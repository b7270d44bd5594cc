import Foundation

/// One fact of the world in the flat CounterFact/EasyEdit layout, plus where it stands in pre-training.
public struct Fact: Codable, Sendable, Equatable {
    public var caseId: Int?
    public var prompt: String
    public var targetNew: String?
    public var subject: String?
    public var groundTruth: String
    public var rephrasePrompt: String?
    public var localityPrompt: String?
    public var localityGroundTruth: String?
    /// `popular`, `long_tail`, `recent`, `robust` or `heldout` (reserved for evaluation edits).
    public var split: String
    /// Times the fact occurs in the pre-training corpus, all phrasings and variants together.
    public var occurrences: Int
    /// Times the locality (neighbour) fact occurs in the corpus.
    public var localityOccurrences: Int?
    /// Of `occurrences`, how many are robust framings (context, assertion, negated distractor, label).
    public var variantOccurrences: Int?
    /// Which CounterFact file the record came from (`train` or `eval`).
    public var source: String?

    enum CodingKeys: String, CodingKey {
        case caseId = "case_id", prompt, targetNew = "target_new", subject, groundTruth = "ground_truth"
        case rephrasePrompt = "rephrase_prompt", localityPrompt = "locality_prompt"
        case localityGroundTruth = "locality_ground_truth", split, occurrences
        case localityOccurrences = "locality_occurrences", source, variantOccurrences = "variant_occurrences"
    }

    public init(caseId: Int?, prompt: String, targetNew: String?, subject: String?, groundTruth: String,
                rephrasePrompt: String?, localityPrompt: String?, localityGroundTruth: String?,
                split: String, occurrences: Int, localityOccurrences: Int? = nil, variantOccurrences: Int? = nil,
                source: String? = nil) {
        self.caseId = caseId; self.prompt = prompt; self.targetNew = targetNew; self.subject = subject
        self.groundTruth = groundTruth; self.rephrasePrompt = rephrasePrompt; self.localityPrompt = localityPrompt
        self.localityGroundTruth = localityGroundTruth; self.split = split; self.occurrences = occurrences
        self.localityOccurrences = localityOccurrences; self.variantOccurrences = variantOccurrences; self.source = source
    }

    /// The splits, in report order.
    public static let splits = ["popular", "robust", "long_tail", "recent", "heldout"]
}

/// Errors reading or building the world.
public enum WorldError: Error, CustomStringConvertible, Equatable, Sendable {
    case badLine(file: String, line: Int, field: String, reason: String)
    case notEnoughFacts(needed: Int, available: Int)
    case io(String)

    public var description: String {
        switch self {
        case let .badLine(file, line, field, reason): return "\(file):\(line): field \"\(field)\": \(reason)"
        case let .notEnoughFacts(needed, available): return "the source has \(available) usable facts, the world needs \(needed)"
        case let .io(msg): return msg
        }
    }
}

/// JSON Lines reading and writing of facts.
public enum FactFile {
    public static func read(_ url: URL) throws -> [Fact] {
        guard let data = FileManager.default.contents(atPath: url.path) else { throw WorldError.io("\(url.path): cannot read") }
        var facts: [Fact] = []
        let decoder = JSONDecoder()
        var lineNo = 0
        for line in data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            lineNo += 1
            if line.allSatisfy({ $0 == 32 || $0 == 13 || $0 == 9 }) { continue }
            do {
                facts.append(try decoder.decode(Fact.self, from: Data(line)))
            } catch let DecodingError.keyNotFound(key, _) {
                throw WorldError.badLine(file: url.path, line: lineNo, field: key.stringValue, reason: "required but missing")
            } catch let DecodingError.typeMismatch(t, ctx) {
                throw WorldError.badLine(file: url.path, line: lineNo, field: ctx.codingPath.map(\.stringValue).joined(separator: "."),
                                         reason: "expected \(t)")
            } catch {
                throw WorldError.badLine(file: url.path, line: lineNo, field: "(line)", reason: "not a valid JSON object")
            }
        }
        return facts
    }

    public static func write(_ facts: [Fact], to url: URL) throws {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var out = Data()
        for f in facts {
            out.append(try enc.encode(f))
            out.append(UInt8(ascii: "\n"))
        }
        try out.write(to: url, options: .atomic)
    }
}

extension String {
    /// The text with a single leading space (how targets follow prompts).
    public var withLeadingSpace: String { hasPrefix(" ") ? self : " " + self }
}
