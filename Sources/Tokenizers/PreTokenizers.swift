import Foundation

/// A piece of text on its way to the model. `atStart` says whether it begins at offset 0 of the
/// original input (Metaspace's `prepend_scheme: "first"` needs it).
struct Piece: Sendable {
    var text: String
    var atStart: Bool
}

/// A `pre_tokenizer` stage of tokenizer.json: cuts pieces into smaller pieces (and may rewrite them).
protocol PreTokenizer: Sendable {
    func preTokenize(_ pieces: [Piece]) -> [Piece]
}

/// Decodes the pre-tokenizer named by the `type` field.
struct AnyPreTokenizer: Decodable, Sendable {
    let value: any PreTokenizer

    private enum Keys: String, CodingKey { case type }

    init(from decoder: Decoder) throws {
        let type = try decoder.container(keyedBy: Keys.self).decode(String.self, forKey: .type)
        switch type {
        case "ByteLevel": value = try ByteLevelPreTokenizer(from: decoder)
        case "Sequence": value = try SequencePreTokenizer(from: decoder)
        case "Split": value = try SplitPreTokenizer(from: decoder)
        case "Metaspace": value = try MetaspacePreTokenizer(from: decoder)
        case "Whitespace": value = WhitespacePreTokenizer()
        case "WhitespaceSplit": value = PredicateSplitPreTokenizer(behavior: .removed) { $0.properties.isWhitespace }
        case "Digits":
            let individual = try DigitsOptions(from: decoder).individualDigits ?? false
            value = PredicateSplitPreTokenizer(behavior: individual ? .isolated : .contiguous) { scalar in
                switch scalar.properties.generalCategory {
                case .decimalNumber, .letterNumber, .otherNumber: return true
                default: return false
                }
            }
        case "Punctuation":
            let behavior = try PunctuationOptions(from: decoder).behavior ?? .isolated
            value = PredicateSplitPreTokenizer(behavior: behavior) { scalar in
                switch scalar.properties.generalCategory {
                case .connectorPunctuation, .dashPunctuation, .openPunctuation, .closePunctuation,
                     .initialPunctuation, .finalPunctuation, .otherPunctuation:
                    return true
                default:
                    return scalar.isASCII && (scalar.properties.isPatternSyntax || scalar == "`")
                        && !scalar.properties.isWhitespace
                }
            }
        default:
            throw StageError(kind: .unsupported(stage: "pre_tokenizer", type: type), path: decoder.codingPath)
        }
    }

    private struct DigitsOptions: Decodable {
        let individualDigits: Bool?
        enum CodingKeys: String, CodingKey { case individualDigits = "individual_digits" }
    }

    private struct PunctuationOptions: Decodable {
        let behavior: SplitBehavior?
    }
}

/// How a split treats the delimiters it found (`tokenizers`' `SplitDelimiterBehavior`).
enum SplitBehavior: String, Decodable, Sendable {
    case removed = "Removed"
    case isolated = "Isolated"
    case mergedWithPrevious = "MergedWithPrevious"
    case mergedWithNext = "MergedWithNext"
    case contiguous = "Contiguous"

    /// Applies the behavior to parts that cover a string (alternating or not) and returns the
    /// ranges of the resulting pieces, in order.
    func apply(_ parts: [(range: Range<String.Index>, isMatch: Bool)]) -> [Range<String.Index>] {
        switch self {
        case .isolated:
            return parts.map(\.range)
        case .removed:
            return parts.filter { !$0.isMatch }.map(\.range)
        case .contiguous:
            var out: [Range<String.Index>] = []
            var previousMatch = false
            for part in parts {
                if part.isMatch == previousMatch, let last = out.last {
                    out[out.count - 1] = last.lowerBound..<part.range.upperBound
                } else {
                    out.append(part.range)
                }
                previousMatch = part.isMatch
            }
            return out
        case .mergedWithPrevious:
            var out: [Range<String.Index>] = []
            var previousMatch = false
            for part in parts {
                if part.isMatch && !previousMatch, let last = out.last {
                    out[out.count - 1] = last.lowerBound..<part.range.upperBound
                } else {
                    out.append(part.range)
                }
                previousMatch = part.isMatch
            }
            return out
        case .mergedWithNext:
            var out: [Range<String.Index>] = []
            var previousMatch = false
            for part in parts.reversed() {
                if part.isMatch && !previousMatch, let last = out.last {
                    out[out.count - 1] = part.range.lowerBound..<last.upperBound
                } else {
                    out.append(part.range)
                }
                previousMatch = part.isMatch
            }
            return out.reversed()
        }
    }
}

/// Cuts `piece` at `ranges` (non-empty results only).
private func pieces(of piece: Piece, ranges: [Range<String.Index>]) -> [Piece] {
    ranges.compactMap { range in
        range.isEmpty ? nil
            : Piece(text: String(piece.text.unicodeScalars[range]), atStart: piece.atStart && range.lowerBound == piece.text.startIndex)
    }
}

/// `ByteLevel`: GPT-2's pre-tokenizer. Optionally adds a leading space, splits with the GPT-2
/// regex, and rewrites every piece as byte-level characters.
struct ByteLevelPreTokenizer: PreTokenizer, Decodable {
    let addPrefixSpace: Bool
    let useRegex: Bool

    private enum CodingKeys: String, CodingKey {
        case addPrefixSpace = "add_prefix_space"
        case useRegex = "use_regex"
    }

    init(addPrefixSpace: Bool, useRegex: Bool) {
        self.addPrefixSpace = addPrefixSpace
        self.useRegex = useRegex
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        addPrefixSpace = try container.decodeIfPresent(Bool.self, forKey: .addPrefixSpace) ?? true
        useRegex = try container.decodeIfPresent(Bool.self, forKey: .useRegex) ?? true
    }

    func preTokenize(_ pieces: [Piece]) -> [Piece] {
        var out: [Piece] = []
        for piece in pieces {
            var text = piece.text
            if addPrefixSpace && text.utf8.first != UInt8(ascii: " ") { text = " " + text }
            text.withUTF8 { buffer in
                if useRegex {
                    var first = true
                    GPT2PreTokenizerScanner.scan(buffer) { range in
                        out.append(Piece(text: ByteLevelAlphabet.encode(UnsafeBufferPointer(rebasing: buffer[range])),
                                         atStart: piece.atStart && first))
                        first = false
                    }
                } else if !buffer.isEmpty {
                    out.append(Piece(text: ByteLevelAlphabet.encode(buffer), atStart: piece.atStart))
                }
            }
        }
        return out
    }
}

/// `Sequence`: the pre-tokenizers in order, each on every piece of the previous one.
struct SequencePreTokenizer: PreTokenizer, Decodable {
    let pretokenizers: [AnyPreTokenizer]

    func preTokenize(_ pieces: [Piece]) -> [Piece] {
        pretokenizers.reduce(pieces) { $1.value.preTokenize($0) }
    }
}

/// `Split`: splits on a string or regex pattern with a delimiter behavior.
struct SplitPreTokenizer: PreTokenizer, Decodable {
    let pattern: Pattern
    let behavior: SplitBehavior
    let invert: Bool

    private enum CodingKeys: String, CodingKey { case pattern, behavior, invert }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        pattern = try container.decode(Pattern.self, forKey: .pattern)
        behavior = try container.decode(SplitBehavior.self, forKey: .behavior)
        invert = try container.decodeIfPresent(Bool.self, forKey: .invert) ?? false
    }

    func preTokenize(_ input: [Piece]) -> [Piece] {
        input.flatMap { piece -> [Piece] in
            var parts = pattern.parts(of: piece.text)
            if invert { parts = parts.map { ($0.range, !$0.isMatch) } }
            return pieces(of: piece, ranges: behavior.apply(parts))
        }
    }
}

/// Splits on single characters chosen by a predicate (`WhitespaceSplit`, `Digits`, `Punctuation`).
struct PredicateSplitPreTokenizer: PreTokenizer {
    let behavior: SplitBehavior
    let isDelimiter: @Sendable (Unicode.Scalar) -> Bool

    init(behavior: SplitBehavior, isDelimiter: @escaping @Sendable (Unicode.Scalar) -> Bool) {
        self.behavior = behavior
        self.isDelimiter = isDelimiter
    }

    func preTokenize(_ input: [Piece]) -> [Piece] {
        input.flatMap { piece -> [Piece] in
            pieces(of: piece, ranges: behavior.apply(scalarParts(piece.text, isDelimiter)))
        }
    }
}

/// Every delimiter scalar as its own matched part, the runs between as unmatched parts.
private func scalarParts(_ text: String, _ isDelimiter: (Unicode.Scalar) -> Bool)
    -> [(range: Range<String.Index>, isMatch: Bool)] {
    var parts: [(Range<String.Index>, Bool)] = []
    let scalars = text.unicodeScalars
    var runStart = scalars.startIndex
    var index = scalars.startIndex
    while index < scalars.endIndex {
        let next = scalars.index(after: index)
        if isDelimiter(scalars[index]) {
            if runStart < index { parts.append((runStart..<index, false)) }
            parts.append((index..<next, true))
            runStart = next
        }
        index = next
    }
    if runStart < scalars.endIndex { parts.append((runStart..<scalars.endIndex, false)) }
    return parts
}

/// `Whitespace`: the pieces matching `\w+|[^\w\s]+`.
struct WhitespacePreTokenizer: PreTokenizer {
    static func isWord(_ scalar: Unicode.Scalar) -> Bool {
        let properties = scalar.properties
        if properties.isAlphabetic || properties.isJoinControl { return true }
        switch properties.generalCategory {
        case .nonspacingMark, .spacingMark, .enclosingMark, .decimalNumber, .connectorPunctuation: return true
        default: return false
        }
    }

    func preTokenize(_ input: [Piece]) -> [Piece] {
        var out: [Piece] = []
        for piece in input {
            let scalars = piece.text.unicodeScalars
            var index = scalars.startIndex
            while index < scalars.endIndex {
                let scalar = scalars[index]
                if scalar.properties.isWhitespace { index = scalars.index(after: index); continue }
                let word = Self.isWord(scalar)
                let start = index
                while index < scalars.endIndex, !scalars[index].properties.isWhitespace,
                      Self.isWord(scalars[index]) == word {
                    index = scalars.index(after: index)
                }
                out.append(Piece(text: String(scalars[start..<index]),
                                 atStart: piece.atStart && start == scalars.startIndex))
            }
        }
        return out
    }
}

/// `Metaspace`: spaces become `▁`, a `▁` is prepended (always, or only at the start of the
/// input), and the text is split before each `▁`.
struct MetaspacePreTokenizer: PreTokenizer, Decodable {
    enum PrependScheme: String, Decodable, Sendable {
        case always, first, never
    }
    let replacement: String
    let prependScheme: PrependScheme
    let split: Bool

    private enum CodingKeys: String, CodingKey {
        case replacement
        case prependScheme = "prepend_scheme"
        case addPrefixSpace = "add_prefix_space"
        case split
    }

    init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        replacement = try container.decode(String.self, forKey: .replacement)
        guard replacement.unicodeScalars.count == 1 else {
            throw StageError(kind: .invalid(reason: "replacement must be one character"),
                             path: container.codingPath + [CodingKeys.replacement])
        }
        var scheme = try container.decodeIfPresent(PrependScheme.self, forKey: .prependScheme) ?? .always
        if try container.decodeIfPresent(Bool.self, forKey: .addPrefixSpace) == false { scheme = .never }
        prependScheme = scheme
        split = try container.decodeIfPresent(Bool.self, forKey: .split) ?? true
    }

    func preTokenize(_ input: [Piece]) -> [Piece] {
        let replacementScalar = replacement.unicodeScalars.first!
        return input.flatMap { piece -> [Piece] in
            var text = String(piece.text.unicodeScalars.map { $0 == " " ? replacementScalar : $0 }
                .reduce(into: String.UnicodeScalarView()) { $0.append($1) })
            let starts = text.unicodeScalars.first == replacementScalar
            switch prependScheme {
            case .always where !starts: text = replacement + text
            case .first where !starts && piece.atStart: text = replacement + text
            default: break
            }
            let updated = Piece(text: text, atStart: piece.atStart)
            guard split else { return [updated] }
            let parts = scalarParts(text) { $0 == replacementScalar }
            return pieces(of: updated, ranges: SplitBehavior.mergedWithNext.apply(parts))
        }
    }
}
