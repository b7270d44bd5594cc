import Foundation

/// One entry of `added_tokens` in tokenizer.json.
public struct AddedToken: Decodable, Sendable, Equatable {
    public let id: Int
    public let content: String
    public let singleWord: Bool
    public let leftStrip: Bool
    public let rightStrip: Bool
    /// Whether the token is matched in the normalized text (else in the raw input).
    public let normalized: Bool
    /// Special tokens are skipped by `decode(_:skipSpecialTokens: true)`.
    public let special: Bool

    private enum CodingKeys: String, CodingKey {
        case id, content, special, normalized
        case singleWord = "single_word"
        case leftStrip = "lstrip"
        case rightStrip = "rstrip"
    }

    public init(id: Int, content: String, special: Bool, normalized: Bool? = nil,
                singleWord: Bool = false, leftStrip: Bool = false, rightStrip: Bool = false) {
        self.id = id
        self.content = content
        self.special = special
        self.normalized = normalized ?? !special
        self.singleWord = singleWord
        self.leftStrip = leftStrip
        self.rightStrip = rightStrip
    }

    public init(from decoder: Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        id = try container.decode(Int.self, forKey: .id)
        content = try container.decode(String.self, forKey: .content)
        special = try container.decodeIfPresent(Bool.self, forKey: .special) ?? false
        normalized = try container.decodeIfPresent(Bool.self, forKey: .normalized) ?? !special
        singleWord = try container.decodeIfPresent(Bool.self, forKey: .singleWord) ?? false
        leftStrip = try container.decodeIfPresent(Bool.self, forKey: .leftStrip) ?? false
        rightStrip = try container.decodeIfPresent(Bool.self, forKey: .rightStrip) ?? false
    }
}

/// Finds added tokens in text before the model sees it, as `tokenizers`' `AddedVocabulary`:
/// leftmost-longest matching, non-overlapping, with `single_word`, `lstrip` and `rstrip`.
struct AddedTokenMatcher: Sendable {
    private struct Candidate: Sendable {
        let bytes: [UInt8]
        let token: AddedToken
    }
    /// Candidates by first byte, longest first.
    private let candidates: [[Candidate]]

    /// nil when there is nothing to match.
    init?(tokens: [(pattern: String, token: AddedToken)]) {
        var table = [[Candidate]](repeating: [], count: 256)
        var any = false
        for (pattern, token) in tokens {
            let bytes = Array(pattern.utf8)
            guard let first = bytes.first else { continue }
            table[Int(first)].append(Candidate(bytes: bytes, token: token))
            any = true
        }
        guard any else { return nil }
        candidates = table.map { $0.sorted { $0.bytes.count > $1.bytes.count } }
    }

    enum Segment {
        case text(String, atStart: Bool)
        case token(Int)
    }

    /// Cuts `text` into plain segments and added-token ids (empty text segments are dropped).
    func split(_ text: String, atStart: Bool) -> [Segment] {
        var copy = text
        return copy.withUTF8 { bytes -> [Segment] in
            let n = bytes.count
            var splits: [(Range<Int>, Int?)] = []
            var consumed = 0
            var p = 0
            while p < n {
                var found: Candidate?
                for candidate in candidates[Int(bytes[p])] where p + candidate.bytes.count <= n {
                    var equal = true
                    for (k, byte) in candidate.bytes.enumerated() where bytes[p + k] != byte { equal = false; break }
                    if equal { found = candidate; break }
                }
                guard let match = found else { p += 1; continue }
                var start = p
                var stop = p + match.bytes.count
                p = stop
                let token = match.token
                if token.singleWord {
                    let before = start == 0 || !isWordScalar(lastScalar(before: start, bytes))
                    let after = stop == n || !isWordScalar(firstScalar(at: stop, bytes))
                    if !before || !after { continue }
                }
                if token.leftStrip {
                    var s = start
                    while s > consumed, let scalar = lastScalar(before: s, bytes), scalar.properties.isWhitespace {
                        s -= scalar.utf8.count
                    }
                    start = max(s, consumed)
                }
                if token.rightStrip {
                    while stop < n, let scalar = firstScalar(at: stop, bytes), scalar.properties.isWhitespace {
                        stop += scalar.utf8.count
                    }
                    p = stop
                }
                if consumed < start { splits.append((consumed..<start, nil)) }
                splits.append((start..<stop, token.id))
                consumed = stop
            }
            if consumed < n { splits.append((consumed..<n, nil)) }
            return splits.map { range, id in
                if let id { return .token(id) }
                return .text(String(decoding: UnsafeBufferPointer(rebasing: bytes[range]), as: UTF8.self),
                             atStart: atStart && range.lowerBound == 0)
            }
        }
    }
}

private func lastScalar(before end: Int, _ bytes: UnsafeBufferPointer<UInt8>) -> Unicode.Scalar? {
    guard end > 0 else { return nil }
    var start = end - 1
    while start > 0, bytes[start] & 0xC0 == 0x80 { start -= 1 }
    return firstScalar(at: start, bytes)
}

private func firstScalar(at start: Int, _ bytes: UnsafeBufferPointer<UInt8>) -> Unicode.Scalar? {
    guard start < bytes.count else { return nil }
    var iterator = UnsafeBufferPointer(rebasing: bytes[start...]).makeIterator()
    var codec = UTF8()
    if case .scalarValue(let scalar) = codec.decode(&iterator) { return scalar }
    return nil
}

private func isWordScalar(_ scalar: Unicode.Scalar?) -> Bool {
    guard let scalar else { return false }
    return WhitespacePreTokenizer.isWord(scalar)
}
