import Foundation

/// A Hugging Face tokenizer loaded from `tokenizer.json` (and optionally `tokenizer_config.json`).
///
/// The pipeline is that of the `tokenizers` library: added tokens are split out first (longest
/// match), then normalizer → pre-tokenizer → BPE model → post-processor; decoding runs the decoder
/// stages. Ids match `tokenizers` exactly for the layouts this package implements (GPT-2 byte-level
/// BPE, Llama-2 BPE with byte fallback, and the other stages listed in the README).
///
/// Instances are immutable apart from an internal, locked word cache, and may be shared across threads.
public final class Tokenizer: Sendable {
    private let model: BPEModel
    private let normalizer: (any Normalizer)?
    private let preTokenizer: (any PreTokenizer)?
    private let postProcessor: (any PostProcessor)?
    private let decoder: (any TokenDecoder)?
    private let rawMatcher: AddedTokenMatcher?
    private let normalizedMatcher: AddedTokenMatcher?
    /// id → content of the added tokens.
    private let addedTokenContents: [Int: String]
    private let addedTokenIDs: [TokenKey: Int]

    /// The `added_tokens` of tokenizer.json, with the ids in use.
    public let addedTokens: [AddedToken]
    /// Ids of the special added tokens (skipped when decoding with `skipSpecialTokens`).
    public let specialTokenIDs: Set<Int>
    /// The number of ids: one more than the largest id of the vocabulary and the added tokens.
    public let vocabSize: Int

    /// Beginning-of-sequence token from tokenizer_config.json, when given.
    public let bosToken: String?
    /// End-of-sequence token from tokenizer_config.json, when given.
    public let eosToken: String?
    /// Unknown token from tokenizer_config.json, else the model's `unk_token`.
    public let unkToken: String?
    /// Padding token from tokenizer_config.json, when given.
    public let padToken: String?
    /// `model_max_length` from tokenizer_config.json, when given and finite.
    public let modelMaxLength: Int?

    /// The id of `bosToken`, when it exists.
    public var bosTokenID: Int? { bosToken.flatMap(id(for:)) }
    /// The id of `eosToken`, when it exists.
    public var eosTokenID: Int? { eosToken.flatMap(id(for:)) }
    /// The id of `unkToken`, when it exists.
    public var unkTokenID: Int? { unkToken.flatMap(id(for:)) }
    /// The id of `padToken`, when it exists.
    public var padTokenID: Int? { padToken.flatMap(id(for:)) }

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from a model folder.
    public static func load(folder: URL) throws -> Tokenizer {
        let jsonURL = folder.appendingPathComponent("tokenizer.json")
        let configURL = folder.appendingPathComponent("tokenizer_config.json")
        let json = try readFile(jsonURL)
        let config = FileManager.default.fileExists(atPath: configURL.path) ? try readFile(configURL) : nil
        return try Tokenizer(tokenizerJSON: json, tokenizerConfig: config,
                             jsonName: jsonURL.path, configName: configURL.path)
    }

    /// Builds a tokenizer from the bytes of a tokenizer.json (and optionally a tokenizer_config.json).
    /// `jsonName` and `configName` label error messages.
    public init(tokenizerJSON: Data, tokenizerConfig: Data? = nil,
                jsonName: String = "tokenizer.json", configName: String = "tokenizer_config.json") throws {
        let spec = try decodeJSON(TokenizerSpec.self, from: tokenizerJSON, file: jsonName)
        guard let vocabulary = try JSONVocabScanner.modelVocabulary(in: tokenizerJSON, file: jsonName) else {
            throw TokenizerError.malformedJSON(file: jsonName, field: "model.vocab", reason: "expected an object")
        }
        let model = try BPEModel(
            vocabulary: vocabulary, merges: spec.model.merges, unknownToken: spec.model.unknownToken,
            continuingSubwordPrefix: spec.model.continuingSubwordPrefix, endOfWordSuffix: spec.model.endOfWordSuffix,
            fuseUnknown: spec.model.fuseUnknown, byteFallback: spec.model.byteFallback,
            ignoreMerges: spec.model.ignoreMerges, file: jsonName)
        let config = try tokenizerConfig.map { try decodeJSON(TokenizerConfigSpec.self, from: $0, file: configName) }

        self.model = model
        self.normalizer = spec.normalizer?.value
        self.preTokenizer = spec.preTokenizer?.value
        self.postProcessor = spec.postProcessor?.value
        self.decoder = spec.decoder?.value

        // Like `tokenizers`, an added token that is also in the model's vocabulary keeps the model's id.
        var added: [AddedToken] = []
        var contents: [Int: String] = [:]
        var ids: [TokenKey: Int] = [:]
        var special: Set<Int> = []
        for (index, token) in spec.addedTokens.enumerated() {
            guard !token.content.isEmpty else { continue }
            guard token.id >= 0, token.id < 16_777_216 else {
                throw TokenizerError.malformedJSON(file: jsonName, field: "added_tokens[\(index)].id",
                                                   reason: "id \(token.id) is out of range")
            }
            let id = model.vocabulary[TokenKey(token.content)] ?? token.id
            let resolved = AddedToken(id: id, content: token.content, special: token.special, normalized: token.normalized,
                                      singleWord: token.singleWord, leftStrip: token.leftStrip, rightStrip: token.rightStrip)
            added.append(resolved)
            contents[id] = token.content
            ids[TokenKey(token.content)] = id
            if token.special { special.insert(id) }
        }
        let normalizer = self.normalizer
        self.rawMatcher = AddedTokenMatcher(tokens: added.filter { !$0.normalized }.map { ($0.content, $0) })
        self.normalizedMatcher = AddedTokenMatcher(tokens: added.filter(\.normalized).map {
            (normalizer?.normalize($0.content) ?? $0.content, $0)
        })
        self.addedTokens = added
        self.addedTokenContents = contents
        self.addedTokenIDs = ids
        self.specialTokenIDs = special
        self.vocabSize = max(model.idCount, (contents.keys.max() ?? -1) + 1)

        self.bosToken = config?.bosToken
        self.eosToken = config?.eosToken
        self.unkToken = config?.unkToken ?? spec.model.unknownToken
        self.padToken = config?.padToken
        self.modelMaxLength = config?.modelMaxLength
    }

    private static func readFile(_ url: URL) throws -> Data {
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw TokenizerError.fileNotFound(path: url.path)
        }
        do {
            return try Data(contentsOf: url)
        } catch {
            throw TokenizerError.unreadableFile(path: url.path, reason: error.localizedDescription)
        }
    }

    // MARK: - Encoding

    /// The ids of `text`; with `addSpecialTokens`, the post-processor adds its special tokens
    /// (Llama: a leading `<s>`; GPT-2: none).
    public func encode(_ text: String, addSpecialTokens: Bool = true) -> [Int] {
        var ids: [Int] = []
        ids.reserveCapacity(text.utf8.count / 3 + 4)
        let rawSegments = rawMatcher?.split(text, atStart: true) ?? [.text(text, atStart: true)]
        for segment in rawSegments {
            switch segment {
            case .token(let id):
                ids.append(id)
            case .text(let raw, let atStart):
                let normalized = normalizer?.normalize(raw) ?? raw
                let segments = normalizedMatcher?.split(normalized, atStart: atStart) ?? [.text(normalized, atStart: atStart)]
                for inner in segments {
                    switch inner {
                    case .token(let id):
                        ids.append(id)
                    case .text(let piece, let pieceAtStart):
                        guard !piece.isEmpty else { continue }
                        let start = [Piece(text: piece, atStart: pieceAtStart)]
                        for word in preTokenizer?.preTokenize(start) ?? start {
                            model.tokenize(word.text, into: &ids)
                        }
                    }
                }
            }
        }
        return postProcessor?.process(ids, addSpecialTokens: addSpecialTokens) ?? ids
    }

    /// The token strings of `text` (as `tokenizers`' `Encoding.tokens`).
    public func tokens(_ text: String, addSpecialTokens: Bool = true) -> [String] {
        tokens(for: encode(text, addSpecialTokens: addSpecialTokens))
    }

    /// The token strings of `ids` (empty strings for unknown ids).
    public func tokens(for ids: [Int]) -> [String] {
        ids.map { token(for: $0) ?? "" }
    }

    /// The id of a token of the vocabulary or of the added tokens.
    public func id(for token: String) -> Int? {
        addedTokenIDs[TokenKey(token)] ?? model.vocabulary[TokenKey(token)]
    }

    /// The token with id `id`, or nil.
    public func token(for id: Int) -> String? {
        if let added = addedTokenContents[id] { return added }
        guard id >= 0, id < model.tokens.count else { return nil }
        return model.tokens[id]
    }

    // MARK: - Decoding

    /// The text of `ids`. Unknown ids are ignored; with `skipSpecialTokens`, special added tokens too.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = true) -> String {
        var tokens: [String] = []
        tokens.reserveCapacity(ids.count)
        for id in ids {
            if skipSpecialTokens && specialTokenIDs.contains(id) { continue }
            if let token = token(for: id) { tokens.append(token) }
        }
        guard let decoder else { return tokens.joined(separator: " ") }
        return decoder.decodeChain(tokens).joined()
    }
}
