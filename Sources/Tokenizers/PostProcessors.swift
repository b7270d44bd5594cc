import Foundation

/// A `post_processor` stage of tokenizer.json: adds special tokens around an encoded sequence.
protocol PostProcessor: Sendable {
    func process(_ ids: [Int], addSpecialTokens: Bool) -> [Int]
}

/// Decodes the post-processor named by the `type` field.
struct AnyPostProcessor: Decodable, Sendable {
    let value: any PostProcessor

    private enum Keys: String, CodingKey { case type }

    init(from decoder: Decoder) throws {
        let type = try decoder.container(keyedBy: Keys.self).decode(String.self, forKey: .type)
        switch type {
        case "ByteLevel": value = IdentityPostProcessor()
        case "TemplateProcessing": value = try TemplateProcessing(from: decoder)
        case "Sequence": value = try SequencePostProcessor(from: decoder)
        case "BertProcessing", "RobertaProcessing": value = try WrapPostProcessor(from: decoder)
        default:
            throw StageError(kind: .unsupported(stage: "post_processor", type: type), path: decoder.codingPath)
        }
    }
}

/// `ByteLevel` post-processor: only trims offsets in `tokenizers`; ids are unchanged.
struct IdentityPostProcessor: PostProcessor {
    func process(_ ids: [Int], addSpecialTokens: Bool) -> [Int] { ids }
}

/// `Sequence`: the post-processors in order.
struct SequencePostProcessor: PostProcessor, Decodable {
    let processors: [AnyPostProcessor]

    func process(_ ids: [Int], addSpecialTokens: Bool) -> [Int] {
        processors.reduce(ids) { $1.value.process($0, addSpecialTokens: addSpecialTokens) }
    }
}

/// `BertProcessing` (`[CLS] A [SEP]`) and `RobertaProcessing` (`<s> A </s>`).
struct WrapPostProcessor: PostProcessor, Decodable {
    let cls: Int
    let sep: Int

    private enum CodingKeys: String, CodingKey { case cls, sep }

    /// A `["token", id]` pair.
    private struct TokenAndID: Decodable {
        let id: Int
        init(from decoder: Decoder) throws {
            var container = try decoder.unkeyedContainer()
            _ = try container.decode(String.self)
            id = try container.decode(Int.self)
        }
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        cls = try container.decode(TokenAndID.self, forKey: .cls).id
        sep = try container.decode(TokenAndID.self, forKey: .sep).id
    }

    func process(_ ids: [Int], addSpecialTokens: Bool) -> [Int] {
        addSpecialTokens ? [cls] + ids + [sep] : ids
    }
}

/// `TemplateProcessing`: the `single` template, e.g. `<s> $A` for Llama.
struct TemplateProcessing: PostProcessor, Decodable {
    enum Item: Sendable {
        case sequence
        case special([Int])
    }
    let single: [Item]

    private enum CodingKeys: String, CodingKey {
        case single
        case specialTokens = "special_tokens"
    }

    private struct ItemSpec: Decodable {
        struct Named: Decodable { let id: String }
        let specialToken: Named?
        let sequence: Named?
        enum CodingKeys: String, CodingKey {
            case specialToken = "SpecialToken"
            case sequence = "Sequence"
        }
    }

    private struct SpecialSpec: Decodable {
        let ids: [Int]
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let items = try container.decode([ItemSpec].self, forKey: .single)
        let specials = try container.decodeIfPresent([String: SpecialSpec].self, forKey: .specialTokens) ?? [:]
        single = try items.enumerated().map { index, item in
            if let special = item.specialToken {
                guard let spec = specials[special.id] else {
                    throw StageError(kind: .invalid(reason: "special token \(debugToken(special.id)) is not in special_tokens"),
                                     path: container.codingPath + [CodingKeys.single, AnyCodingKey(intValue: index)!])
                }
                return .special(spec.ids)
            }
            if item.sequence != nil { return .sequence }
            throw StageError(kind: .invalid(reason: "a template item needs \"SpecialToken\" or \"Sequence\""),
                             path: container.codingPath + [CodingKeys.single, AnyCodingKey(intValue: index)!])
        }
    }

    func process(_ ids: [Int], addSpecialTokens: Bool) -> [Int] {
        guard addSpecialTokens else { return ids }
        var out: [Int] = []
        out.reserveCapacity(ids.count + single.count)
        for item in single {
            switch item {
            case .sequence: out.append(contentsOf: ids)
            case .special(let specialIDs): out.append(contentsOf: specialIDs)
            }
        }
        return out
    }
}
