import Foundation

/// The top level of a Hugging Face tokenizer.json, each stage decoded by its `type`.
/// (`model.vocab` is read separately, byte-exactly, by `JSONVocabScanner`.)
struct TokenizerSpec: Decodable {
    let addedTokens: [AddedToken]
    let normalizer: AnyNormalizer?
    let preTokenizer: AnyPreTokenizer?
    let postProcessor: AnyPostProcessor?
    let decoder: AnyTokenDecoder?
    let model: BPEModelSpec

    private enum CodingKeys: String, CodingKey {
        case addedTokens = "added_tokens"
        case normalizer
        case preTokenizer = "pre_tokenizer"
        case postProcessor = "post_processor"
        case decoder
        case model
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        addedTokens = try container.decodeIfPresent([AddedToken].self, forKey: .addedTokens) ?? []
        normalizer = try container.decodeIfPresent(AnyNormalizer.self, forKey: .normalizer)
        preTokenizer = try container.decodeIfPresent(AnyPreTokenizer.self, forKey: .preTokenizer)
        postProcessor = try container.decodeIfPresent(AnyPostProcessor.self, forKey: .postProcessor)
        self.decoder = try container.decodeIfPresent(AnyTokenDecoder.self, forKey: .decoder)
        model = try container.decode(BPEModelSpec.self, forKey: .model)
    }
}

/// The `model` section; only `BPE` is implemented.
struct BPEModelSpec: Decodable {
    let unknownToken: String?
    let continuingSubwordPrefix: String?
    let endOfWordSuffix: String?
    let fuseUnknown: Bool
    let byteFallback: Bool
    let ignoreMerges: Bool
    let merges: [(String, String)]

    private enum CodingKeys: String, CodingKey {
        case type, dropout, vocab, merges
        case unknownToken = "unk_token"
        case continuingSubwordPrefix = "continuing_subword_prefix"
        case endOfWordSuffix = "end_of_word_suffix"
        case fuseUnknown = "fuse_unk"
        case byteFallback = "byte_fallback"
        case ignoreMerges = "ignore_merges"
    }

    /// A merge written as `"a b"` (older files) or `["a", "b"]`.
    private struct MergeEntry: Decodable {
        let left: String
        let right: String

        init(from decoder: Decoder) throws {
            let container = try decoder.singleValueContainer()
            if let line = try? container.decode(String.self) {
                // Split on the space scalar: splitting Characters would miss " " before a combining mark.
                let parts = line.unicodeScalars.split(separator: " ", omittingEmptySubsequences: false)
                guard parts.count == 2 else {
                    throw StageError(kind: .invalid(reason: "merge \(debugToken(line)) is not two tokens separated by one space"),
                                     path: decoder.codingPath)
                }
                left = String(parts[0])
                right = String(parts[1])
            } else if let pair = try? container.decode([String].self), pair.count == 2 {
                left = pair[0]
                right = pair[1]
            } else {
                throw StageError(kind: .invalid(reason: "a merge must be \"a b\" or [\"a\", \"b\"]"),
                                 path: decoder.codingPath)
            }
        }
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let type = try container.decodeIfPresent(String.self, forKey: .type) ?? "BPE"
        guard type == "BPE" else {
            throw StageError(kind: .unsupported(stage: "model", type: type), path: decoder.codingPath)
        }
        if let dropout = try container.decodeIfPresent(Double.self, forKey: .dropout), dropout > 0 {
            throw StageError(kind: .invalid(reason: "BPE dropout \(dropout) is not supported (inference only)"),
                             path: container.codingPath + [CodingKeys.dropout])
        }
        guard container.contains(.vocab) else {
            throw DecodingError.keyNotFound(CodingKeys.vocab, .init(codingPath: container.codingPath, debugDescription: ""))
        }
        unknownToken = try container.decodeIfPresent(String.self, forKey: .unknownToken)
        continuingSubwordPrefix = try container.decodeIfPresent(String.self, forKey: .continuingSubwordPrefix)
        endOfWordSuffix = try container.decodeIfPresent(String.self, forKey: .endOfWordSuffix)
        fuseUnknown = try container.decodeIfPresent(Bool.self, forKey: .fuseUnknown) ?? false
        byteFallback = try container.decodeIfPresent(Bool.self, forKey: .byteFallback) ?? false
        ignoreMerges = try container.decodeIfPresent(Bool.self, forKey: .ignoreMerges) ?? false
        merges = try container.decode([MergeEntry].self, forKey: .merges).map { ($0.left, $0.right) }
    }
}

/// The parts of tokenizer_config.json this package uses.
struct TokenizerConfigSpec: Decodable {
    let bosToken: String?
    let eosToken: String?
    let unkToken: String?
    let padToken: String?
    let modelMaxLength: Int?

    private enum CodingKeys: String, CodingKey {
        case bosToken = "bos_token"
        case eosToken = "eos_token"
        case unkToken = "unk_token"
        case padToken = "pad_token"
        case modelMaxLength = "model_max_length"
    }

    /// A token written as `"<s>"` or as an added-token object `{"content": "<s>", ...}`.
    private struct TokenValue: Decodable {
        let content: String
        private enum Keys: String, CodingKey { case content }
        init(from decoder: Decoder) throws {
            if let text = try? decoder.singleValueContainer().decode(String.self) {
                content = text
            } else {
                content = try decoder.container(keyedBy: Keys.self).decode(String.self, forKey: .content)
            }
        }
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        bosToken = try container.decodeIfPresent(TokenValue.self, forKey: .bosToken)?.content
        eosToken = try container.decodeIfPresent(TokenValue.self, forKey: .eosToken)?.content
        unkToken = try container.decodeIfPresent(TokenValue.self, forKey: .unkToken)?.content
        padToken = try container.decodeIfPresent(TokenValue.self, forKey: .padToken)?.content
        // transformers writes 1e30 for "no limit".
        if let length = try container.decodeIfPresent(Double.self, forKey: .modelMaxLength),
           length.isFinite, length >= 0, length < 1e15 {
            modelMaxLength = Int(length)
        } else {
            modelMaxLength = nil
        }
    }
}
