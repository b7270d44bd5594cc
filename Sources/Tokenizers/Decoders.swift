import Foundation

/// A `decoder` stage of tokenizer.json: turns token strings back into text. Stages are chained
/// over the token list, then the result is concatenated (as `tokenizers`' `decode_chain`).
protocol TokenDecoder: Sendable {
    func decodeChain(_ tokens: [String]) -> [String]
}

/// Decodes the decoder named by the `type` field.
struct AnyTokenDecoder: Decodable, Sendable {
    let value: any TokenDecoder

    private enum Keys: String, CodingKey { case type }

    init(from decoder: Decoder) throws {
        let type = try decoder.container(keyedBy: Keys.self).decode(String.self, forKey: .type)
        switch type {
        case "ByteLevel": value = ByteLevelDecoder()
        case "Sequence": value = try SequenceDecoder(from: decoder)
        case "Replace": value = try ReplaceDecoder(from: decoder)
        case "ByteFallback": value = ByteFallbackDecoder()
        case "Fuse": value = FuseDecoder()
        case "Strip": value = try StripDecoder(from: decoder)
        case "Metaspace": value = try MetaspaceDecoder(from: decoder)
        case "BPEDecoder": value = try BPESuffixDecoder(from: decoder)
        default:
            throw StageError(kind: .unsupported(stage: "decoder", type: type), path: decoder.codingPath)
        }
    }
}

/// `ByteLevel`: byte-level characters back to bytes, then UTF-8 (invalid bytes become U+FFFD).
/// A token holding a character outside the byte-level alphabet contributes its own UTF-8 bytes.
struct ByteLevelDecoder: TokenDecoder {
    func decodeChain(_ tokens: [String]) -> [String] {
        var bytes: [UInt8] = []
        for token in tokens {
            let start = bytes.count
            var ok = true
            for scalar in token.unicodeScalars {
                guard let byte = ByteLevelAlphabet.byte(for: scalar) else { ok = false; break }
                bytes.append(byte)
            }
            if !ok {
                bytes.removeSubrange(start...)
                bytes.append(contentsOf: token.utf8)
            }
        }
        return [String(decoding: bytes, as: UTF8.self)]
    }
}

/// `Sequence`: the decoders in order.
struct SequenceDecoder: TokenDecoder, Decodable {
    let decoders: [AnyTokenDecoder]

    func decodeChain(_ tokens: [String]) -> [String] {
        decoders.reduce(tokens) { $1.value.decodeChain($0) }
    }
}

/// `Replace`: replaces a pattern in every token (Llama: `▁` → space).
struct ReplaceDecoder: TokenDecoder, Decodable {
    let pattern: Pattern
    let content: String

    func decodeChain(_ tokens: [String]) -> [String] {
        tokens.map { pattern.replacing(in: $0, with: content) }
    }
}

/// `ByteFallback`: runs of `<0xAB>` tokens become the text of their bytes, or one U+FFFD per byte
/// when the run is not valid UTF-8.
struct ByteFallbackDecoder: TokenDecoder {
    static func byteValue(_ token: String) -> UInt8? {
        let utf8 = Array(token.utf8)
        guard utf8.count == 6, utf8[0] == UInt8(ascii: "<"), utf8[1] == UInt8(ascii: "0"),
              utf8[2] == UInt8(ascii: "x"), utf8[5] == UInt8(ascii: ">") else { return nil }
        return UInt8(String(decoding: utf8[3..<5], as: UTF8.self), radix: 16)
    }

    func decodeChain(_ tokens: [String]) -> [String] {
        var out: [String] = []
        var pending: [UInt8] = []
        func flush() {
            guard !pending.isEmpty else { return }
            if let text = String(validatingUTF8Bytes: pending) {
                out.append(text)
            } else {
                out.append(contentsOf: repeatElement("\u{FFFD}", count: pending.count))
            }
            pending.removeAll()
        }
        for token in tokens {
            if let byte = Self.byteValue(token) {
                pending.append(byte)
            } else {
                flush()
                out.append(token)
            }
        }
        flush()
        return out
    }
}

extension String {
    /// The string for `bytes` if they are valid UTF-8, else nil.
    init?(validatingUTF8Bytes bytes: [UInt8]) {
        var iterator = bytes.makeIterator()
        var codec = UTF8()
        loop: while true {
            switch codec.decode(&iterator) {
            case .scalarValue: continue
            case .emptyInput: break loop
            case .error: return nil
            }
        }
        self = String(decoding: bytes, as: UTF8.self)
    }
}

/// `Fuse`: all tokens into one.
struct FuseDecoder: TokenDecoder {
    func decodeChain(_ tokens: [String]) -> [String] { [tokens.joined()] }
}

/// `Strip`: removes up to `start` leading and `stop` trailing copies of a character per token.
struct StripDecoder: TokenDecoder, Decodable {
    let content: Character
    let start: Int
    let stop: Int

    private enum CodingKeys: String, CodingKey { case content, start, stop }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let text = try container.decode(String.self, forKey: .content)
        guard text.unicodeScalars.count == 1, let character = text.first else {
            throw StageError(kind: .invalid(reason: "content must be one character"),
                             path: container.codingPath + [CodingKeys.content])
        }
        content = character
        start = max(0, try container.decodeIfPresent(Int.self, forKey: .start) ?? 0)
        stop = max(0, try container.decodeIfPresent(Int.self, forKey: .stop) ?? 0)
    }

    func decodeChain(_ tokens: [String]) -> [String] {
        let scalar = content.unicodeScalars.first!
        return tokens.map { token in
            let scalars = Array(token.unicodeScalars)
            var lower = 0
            while lower < min(start, scalars.count), scalars[lower] == scalar { lower += 1 }
            var upper = scalars.count
            var removed = 0
            while removed < stop, upper > lower, scalars[upper - 1] == scalar { upper -= 1; removed += 1 }
            var view = String.UnicodeScalarView()
            view.append(contentsOf: scalars[lower..<upper])
            return String(view)
        }
    }
}

/// `Metaspace`: `▁` back to spaces; the first token loses its `▁` unless `prepend_scheme` is `never`.
struct MetaspaceDecoder: TokenDecoder, Decodable {
    let replacement: Unicode.Scalar
    let dropLeading: Bool

    private enum CodingKeys: String, CodingKey {
        case replacement
        case prependScheme = "prepend_scheme"
        case addPrefixSpace = "add_prefix_space"
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let text = try container.decode(String.self, forKey: .replacement)
        guard text.unicodeScalars.count == 1 else {
            throw StageError(kind: .invalid(reason: "replacement must be one character"),
                             path: container.codingPath + [CodingKeys.replacement])
        }
        replacement = text.unicodeScalars.first!
        var scheme = try container.decodeIfPresent(String.self, forKey: .prependScheme) ?? "always"
        if try container.decodeIfPresent(Bool.self, forKey: .addPrefixSpace) == false { scheme = "never" }
        dropLeading = scheme != "never"
    }

    func decodeChain(_ tokens: [String]) -> [String] {
        tokens.enumerated().map { index, token in
            var view = String.UnicodeScalarView()
            for scalar in token.unicodeScalars {
                if scalar == replacement {
                    if !(index == 0 && dropLeading) { view.append(" ") }
                } else {
                    view.append(scalar)
                }
            }
            return String(view)
        }
    }
}

/// `BPEDecoder`: the end-of-word suffix becomes a space (nothing on the last token).
struct BPESuffixDecoder: TokenDecoder, Decodable {
    let suffix: String

    private enum CodingKeys: String, CodingKey { case suffix }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        suffix = try container.decodeIfPresent(String.self, forKey: .suffix) ?? "</w>"
    }

    func decodeChain(_ tokens: [String]) -> [String] {
        let literal = Pattern(literal: suffix)
        return tokens.enumerated().map { index, token in
            literal.replacing(in: token, with: index == tokens.count - 1 ? "" : " ")
        }
    }
}
