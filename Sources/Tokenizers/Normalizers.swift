import Foundation

/// A `normalizer` stage of tokenizer.json: rewrites the text before pre-tokenization.
protocol Normalizer: Sendable {
    func normalize(_ text: String) -> String
}

/// Decodes the normalizer named by the `type` field.
struct AnyNormalizer: Decodable, Sendable {
    let value: any Normalizer

    private enum Keys: String, CodingKey { case type }

    init(from decoder: Decoder) throws {
        let type = try decoder.container(keyedBy: Keys.self).decode(String.self, forKey: .type)
        switch type {
        case "Sequence": value = try SequenceNormalizer(from: decoder)
        case "Prepend": value = try PrependNormalizer(from: decoder)
        case "Replace": value = try ReplaceNormalizer(from: decoder)
        case "NFC": value = UnicodeNormalizer(form: .nfc)
        case "NFD": value = UnicodeNormalizer(form: .nfd)
        case "NFKC": value = UnicodeNormalizer(form: .nfkc)
        case "NFKD": value = UnicodeNormalizer(form: .nfkd)
        case "Lowercase": value = LowercaseNormalizer()
        case "Strip": value = try StripNormalizer(from: decoder)
        case "StripAccents": value = StripAccentsNormalizer()
        case "ByteLevel": value = ByteLevelNormalizer()
        default:
            throw StageError(kind: .unsupported(stage: "normalizer", type: type), path: decoder.codingPath)
        }
    }
}

/// `Sequence`: the normalizers in order.
struct SequenceNormalizer: Normalizer, Decodable {
    let normalizers: [AnyNormalizer]

    func normalize(_ text: String) -> String {
        normalizers.reduce(text) { $1.value.normalize($0) }
    }
}

/// `Prepend`: adds a prefix to non-empty text (Llama: `▁`).
struct PrependNormalizer: Normalizer, Decodable {
    let prepend: String

    func normalize(_ text: String) -> String {
        text.isEmpty ? text : prepend + text
    }
}

/// A `{"String": …}` or `{"Regex": …}` pattern of tokenizer.json, compiled once.
struct Pattern: Decodable, Sendable {
    enum Kind: Sendable {
        case literal(String)
        case regex(RegexBox)
    }
    let kind: Kind

    private enum Keys: String, CodingKey {
        case string = "String"
        case regex = "Regex"
    }

    /// A literal pattern.
    init(literal: String) { kind = .literal(literal) }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: Keys.self)
        if let literal = try container.decodeIfPresent(String.self, forKey: .string) {
            kind = .literal(literal)
        } else if let source = try container.decodeIfPresent(String.self, forKey: .regex) {
            do {
                kind = .regex(RegexBox(try NSRegularExpression(pattern: source)))
            } catch {
                throw StageError(kind: .invalid(reason: "cannot compile regex \(debugToken(source))"),
                                 path: decoder.codingPath)
            }
        } else {
            throw StageError(kind: .invalid(reason: "a pattern needs a \"String\" or a \"Regex\""),
                             path: decoder.codingPath)
        }
    }

    /// The text cut into alternating matched and unmatched parts that cover it exactly, as
    /// `tokenizers`' `Pattern::find_matches` (no part is empty).
    func parts(of text: String) -> [(range: Range<String.Index>, isMatch: Bool)] {
        if text.isEmpty { return [] }
        var matches: [Range<String.Index>] = []
        switch kind {
        case .literal(let literal):
            matches = literalMatches(of: literal, in: text)
        case .regex(let box):
            let ns = NSRange(text.startIndex..<text.endIndex, in: text)
            for match in box.regex.matches(in: text, range: ns) {
                if let range = Range(match.range, in: text), !range.isEmpty { matches.append(range) }
            }
        }
        var parts: [(Range<String.Index>, Bool)] = []
        var previous = text.startIndex
        for match in matches {
            if previous < match.lowerBound { parts.append((previous..<match.lowerBound, false)) }
            parts.append((match, true))
            previous = match.upperBound
        }
        if previous < text.endIndex { parts.append((previous..<text.endIndex, false)) }
        return parts
    }

    /// Non-overlapping byte-exact occurrences of `literal`, left to right.
    private func literalMatches(of literal: String, in text: String) -> [Range<String.Index>] {
        let needle = Array(literal.utf8)
        guard !needle.isEmpty else { return [] }
        let utf8 = text.utf8
        let haystack = Array(utf8)
        var result: [Range<String.Index>] = []
        var i = 0
        while i + needle.count <= haystack.count {
            if haystack[i] == needle[0], haystack[i..<(i + needle.count)].elementsEqual(needle) {
                let start = utf8.index(utf8.startIndex, offsetBy: i)
                let end = utf8.index(start, offsetBy: needle.count)
                result.append(start..<end)
                i += needle.count
            } else {
                i += 1
            }
        }
        return result
    }

    /// `text` with every match replaced by `content`.
    func replacing(in text: String, with content: String) -> String {
        if case .literal(let literal) = kind {
            return replacingLiteral(literal, in: text, with: content)
        }
        var out = ""
        for part in parts(of: text) {
            out += part.isMatch ? content : String(text.unicodeScalars[part.range])
        }
        return out
    }
}

/// Byte-exact literal replacement (no canonical-equivalence matching, unlike `String` APIs).
private func replacingLiteral(_ literal: String, in text: String, with content: String) -> String {
    let needle = Array(literal.utf8)
    guard !needle.isEmpty, !text.isEmpty else { return text }
    let replacement = Array(content.utf8)
    var copy = text
    return copy.withUTF8 { haystack -> String in
        var out: [UInt8] = []
        out.reserveCapacity(haystack.count + haystack.count / 4)
        var i = 0
        let n = haystack.count, m = needle.count
        while i < n {
            if haystack[i] == needle[0], i + m <= n {
                var equal = true
                for k in 1..<m where haystack[i + k] != needle[k] { equal = false; break }
                if equal {
                    out.append(contentsOf: replacement)
                    i += m
                    continue
                }
            }
            out.append(haystack[i])
            i += 1
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// `NSRegularExpression` is immutable once built; this box states that for Swift 6.
struct RegexBox: @unchecked Sendable {
    let regex: NSRegularExpression
    init(_ regex: NSRegularExpression) { self.regex = regex }
}

/// `Replace`: replaces every match of a pattern (Llama: `" "` → `"▁"`).
struct ReplaceNormalizer: Normalizer, Decodable {
    let pattern: Pattern
    let content: String

    func normalize(_ text: String) -> String {
        pattern.replacing(in: text, with: content)
    }
}

/// `NFC`, `NFD`, `NFKC`, `NFKD`.
struct UnicodeNormalizer: Normalizer {
    enum Form: Sendable { case nfc, nfd, nfkc, nfkd }
    let form: Form

    func normalize(_ text: String) -> String {
        switch form {
        case .nfc: return text.precomposedStringWithCanonicalMapping
        case .nfd: return text.decomposedStringWithCanonicalMapping
        case .nfkc: return text.precomposedStringWithCompatibilityMapping
        case .nfkd: return text.decomposedStringWithCompatibilityMapping
        }
    }
}

/// `Lowercase`: Unicode lowercase mapping.
struct LowercaseNormalizer: Normalizer {
    func normalize(_ text: String) -> String { text.lowercased() }
}

/// `Strip`: removes leading and/or trailing whitespace.
struct StripNormalizer: Normalizer, Decodable {
    let stripLeft: Bool
    let stripRight: Bool

    private enum CodingKeys: String, CodingKey {
        case stripLeft = "strip_left"
        case stripRight = "strip_right"
    }

    func normalize(_ text: String) -> String {
        var scalars = Substring(text).unicodeScalars
        if stripLeft { while let first = scalars.first, first.properties.isWhitespace { scalars.removeFirst() } }
        if stripRight { while let last = scalars.last, last.properties.isWhitespace { scalars.removeLast() } }
        return String(scalars)
    }
}

/// `StripAccents`: removes combining marks (usually after `NFD`).
struct StripAccentsNormalizer: Normalizer {
    func normalize(_ text: String) -> String {
        var out = String.UnicodeScalarView()
        for scalar in text.unicodeScalars where scalar.properties.generalCategory != .nonspacingMark {
            out.append(scalar)
        }
        return String(out)
    }
}

/// `ByteLevel` normalizer: every byte becomes its byte-level character.
struct ByteLevelNormalizer: Normalizer {
    func normalize(_ text: String) -> String { ByteLevelAlphabet.encode(text) }
}
