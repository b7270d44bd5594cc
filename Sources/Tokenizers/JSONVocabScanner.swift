import Foundation

/// Reads `model.vocab` of a tokenizer.json byte for byte.
///
/// `JSONDecoder` keys objects by `String`, and Swift compares strings by canonical equivalence,
/// so a vocabulary holding both `"é"` (U+00E9) and `"e\u{301}"` would silently lose one entry.
/// This small scanner keeps every key exactly as written, in file order.
struct JSONVocabScanner {
    private let bytes: [UInt8]
    private var index = 0
    private let file: String

    struct Failure: Error { let reason: String }

    init(data: Data, file: String) {
        self.bytes = [UInt8](data)
        self.file = file
    }

    /// The `(token, id)` pairs of `model.vocab`, or nil when there is no such object.
    static func modelVocabulary(in data: Data, file: String) throws -> [(String, Int)]? {
        var scanner = JSONVocabScanner(data: data, file: file)
        do {
            return try scanner.findModelVocabulary()
        } catch let failure as Failure {
            throw TokenizerError.malformedJSON(file: file, field: "model.vocab", reason: failure.reason)
        }
    }

    private mutating func findModelVocabulary() throws -> [(String, Int)]? {
        skipWhitespace()
        guard peek() == UInt8(ascii: "{") else { return nil }
        var result: [(String, Int)]?
        try forEachMember { key, scanner in
            if key == "model", scanner.peek() == UInt8(ascii: "{") {
                try scanner.forEachMember { innerKey, inner in
                    if innerKey == "vocab", inner.peek() == UInt8(ascii: "{") {
                        result = try inner.readVocabularyObject()
                    } else {
                        try inner.skipValue()
                    }
                }
            } else {
                try scanner.skipValue()
            }
        }
        return result
    }

    private mutating func readVocabularyObject() throws -> [(String, Int)] {
        var entries: [(String, Int)] = []
        try forEachMember { key, scanner in
            guard let id = try scanner.readInteger() else {
                throw Failure(reason: "the id of token \(debugToken(key)) is not an integer")
            }
            entries.append((key, id))
        }
        return entries
    }

    // MARK: - Low-level scanning

    private func peek() -> UInt8? { index < bytes.count ? bytes[index] : nil }

    private mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x09, 0x0A, 0x0D: index += 1
            default: return
            }
        }
    }

    private mutating func expect(_ byte: UInt8) throws {
        skipWhitespace()
        guard index < bytes.count, bytes[index] == byte else {
            throw Failure(reason: "expected '\(Character(Unicode.Scalar(byte)))' at byte \(index)")
        }
        index += 1
    }

    /// Calls `body` for every member of the object at the cursor; `body` must consume the value.
    private mutating func forEachMember(_ body: (String, inout JSONVocabScanner) throws -> Void) throws {
        try expect(UInt8(ascii: "{"))
        skipWhitespace()
        if peek() == UInt8(ascii: "}") { index += 1; return }
        while true {
            skipWhitespace()
            let key = try readString()
            try expect(UInt8(ascii: ":"))
            skipWhitespace()
            try body(key, &self)
            skipWhitespace()
            guard let next = peek() else { throw Failure(reason: "unterminated object") }
            index += 1
            if next == UInt8(ascii: "}") { return }
            guard next == UInt8(ascii: ",") else { throw Failure(reason: "expected ',' or '}' at byte \(index - 1)") }
        }
    }

    private mutating func readString() throws -> String {
        guard peek() == UInt8(ascii: "\"") else { throw Failure(reason: "expected a string at byte \(index)") }
        index += 1
        var out: [UInt8] = []
        while index < bytes.count {
            let byte = bytes[index]
            index += 1
            if byte == UInt8(ascii: "\"") {
                return String(decoding: out, as: UTF8.self)
            }
            guard byte == UInt8(ascii: "\\") else { out.append(byte); continue }
            guard index < bytes.count else { break }
            let escape = bytes[index]
            index += 1
            switch escape {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var code = try readHex4()
                if (0xD800..<0xDC00).contains(code), index + 1 < bytes.count,
                   bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u") {
                    let save = index
                    index += 2
                    let low = try readHex4()
                    if (0xDC00..<0xE000).contains(low) {
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    } else {
                        index = save
                    }
                }
                let scalar = Unicode.Scalar(code) ?? "\u{FFFD}"
                out.append(contentsOf: Array(String(Character(scalar)).utf8))
            default:
                throw Failure(reason: "invalid escape at byte \(index - 1)")
            }
        }
        throw Failure(reason: "unterminated string")
    }

    private mutating func readHex4() throws -> UInt32 {
        guard index + 4 <= bytes.count else { throw Failure(reason: "truncated \\u escape") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[index]
            index += 1
            let digit: UInt32
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(byte - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(byte - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(byte - UInt8(ascii: "A") + 10)
            default: throw Failure(reason: "invalid \\u escape")
            }
            value = value * 16 + digit
        }
        return value
    }

    /// Reads a JSON number that must be an integer; nil (and the value skipped) otherwise.
    private mutating func readInteger() throws -> Int? {
        skipWhitespace()
        let start = index
        try skipValue()
        let text = String(decoding: bytes[start..<index], as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        return Int(text)
    }

    private mutating func skipValue() throws {
        skipWhitespace()
        guard let byte = peek() else { throw Failure(reason: "unexpected end of input") }
        switch byte {
        case UInt8(ascii: "\""):
            _ = try readString()
        case UInt8(ascii: "{"):
            try forEachMember { _, scanner in try scanner.skipValue() }
        case UInt8(ascii: "["):
            index += 1
            skipWhitespace()
            if peek() == UInt8(ascii: "]") { index += 1; return }
            while true {
                try skipValue()
                skipWhitespace()
                guard let next = peek() else { throw Failure(reason: "unterminated array") }
                index += 1
                if next == UInt8(ascii: "]") { return }
                guard next == UInt8(ascii: ",") else { throw Failure(reason: "expected ',' or ']'") }
            }
        default:
            // A number or a literal: consume up to the next delimiter.
            while index < bytes.count {
                switch bytes[index] {
                case UInt8(ascii: ","), UInt8(ascii: "}"), UInt8(ascii: "]"), 0x20, 0x09, 0x0A, 0x0D:
                    return
                default:
                    index += 1
                }
            }
        }
    }
}

/// A token as it appears in an error message: quoted, with control characters escaped.
func debugToken(_ token: String) -> String {
    var out = "\""
    for scalar in token.unicodeScalars {
        out += scalar.value < 0x20 || scalar == "\"" || scalar == "\\"
            ? scalar.escaped(asASCII: true) : String(scalar)
    }
    return out + "\""
}
