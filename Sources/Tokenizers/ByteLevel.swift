import Foundation

/// A string key compared byte for byte.
///
/// Swift's `String ==` and hashing follow canonical equivalence (`"é" == "e\u{301}"`), but a
/// vocabulary may hold both spellings as different tokens; this key keeps them apart.
struct TokenKey: Hashable, Sendable {
    let string: String

    init(_ string: String) { self.string = string }

    static func == (lhs: TokenKey, rhs: TokenKey) -> Bool {
        let a = lhs.string.utf8, b = rhs.string.utf8
        guard a.count == b.count else { return false }
        if let equal = a.withContiguousStorageIfAvailable({ pa in
            b.withContiguousStorageIfAvailable { pb in
                pa.count == 0 || memcmp(pa.baseAddress!, pb.baseAddress!, pa.count) == 0
            }
        }), let result = equal {
            return result
        }
        return a.elementsEqual(b)
    }

    func hash(into hasher: inout Hasher) {
        let utf8 = string.utf8
        if utf8.withContiguousStorageIfAvailable({ hasher.combine(bytes: UnsafeRawBufferPointer($0)) }) == nil {
            for byte in utf8 { hasher.combine(byte) }
        }
    }
}

/// GPT-2's reversible map between bytes and printable Unicode characters.
///
/// Bytes that are printable Latin-1 (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) map to themselves; the other 68
/// map to U+0100 onwards, in byte order. Byte-level BPE works on these characters.
public enum ByteLevelAlphabet {
    /// The character (as a scalar value) standing for each byte.
    public static let scalarForByte: [UInt32] = {
        var table = [UInt32](repeating: 0, count: 256)
        var next: UInt32 = 256
        for byte in 0..<256 {
            let printable = (0x21...0x7E).contains(byte) || (0xA1...0xAC).contains(byte) || (0xAE...0xFF).contains(byte)
            if printable {
                table[byte] = UInt32(byte)
            } else {
                table[byte] = next
                next += 1
            }
        }
        return table
    }()

    /// The one-character string standing for each byte.
    public static let stringForByte: [String] = scalarForByte.map { String(Character(Unicode.Scalar($0)!)) }

    /// The byte a character stands for (indexed by scalar value, -1 when none), for decoding.
    static let byteForScalar: [Int16] = {
        var table = [Int16](repeating: -1, count: 0x144)
        for (byte, scalar) in scalarForByte.enumerated() { table[Int(scalar)] = Int16(byte) }
        return table
    }()

    /// The byte a character stands for, or nil.
    @inline(__always)
    static func byte(for scalar: Unicode.Scalar) -> UInt8? {
        let value = Int(scalar.value)
        guard value < byteForScalar.count else { return nil }
        let byte = byteForScalar[value]
        return byte < 0 ? nil : UInt8(byte)
    }

    /// The byte-level string for a run of UTF-8 bytes.
    static func encode(_ bytes: UnsafeBufferPointer<UInt8>) -> String {
        var result = ""
        result.reserveCapacity(bytes.count * 2)
        for byte in bytes { result.unicodeScalars.append(Unicode.Scalar(scalarForByte[Int(byte)])!) }
        return result
    }

    /// The byte-level string for a string's UTF-8 bytes.
    static func encode(_ text: String) -> String {
        var copy = text
        return copy.withUTF8 { encode($0) }
    }
}

/// The GPT-2 pre-tokenizer regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// as a hand-written scanner over UTF-8 (Swift's `Regex` is far too slow for corpora).
///
/// It follows Oniguruma's semantics as `tokenizers` uses them: alternatives are tried in order at
/// each position, `\p{L}`/`\p{N}` are the Unicode general categories L*/N*, and `\s` is
/// `White_Space` (which equals Oniguruma's `[\t\n\v\f\r\x85\p{Z}]`). Characters are Unicode scalars,
/// not grapheme clusters: a combining accent is its own "other" character, as in `tokenizers`.
enum GPT2PreTokenizerScanner {
    static let letter: UInt8 = 0
    static let number: UInt8 = 1
    static let space: UInt8 = 2
    static let other: UInt8 = 3

    private static let asciiClass: [UInt8] = (0..<128).map { byte -> UInt8 in
        classify(Unicode.Scalar(UInt8(byte)))
    }

    static func classify(_ scalar: Unicode.Scalar) -> UInt8 {
        let properties = scalar.properties
        if properties.isWhitespace { return space }
        switch properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter:
            return letter
        case .decimalNumber, .letterNumber, .otherNumber:
            return number
        default:
            return other
        }
    }

    /// The class and byte length of the scalar starting at `p` (valid UTF-8 expected; a truncated
    /// sequence is clamped to the buffer and classed as "other").
    @inline(__always)
    private static func scalar(at p: Int, _ bytes: UnsafeBufferPointer<UInt8>) -> (UInt8, Int) {
        let b0 = bytes[p]
        if b0 < 0x80 { return (asciiClass[Int(b0)], 1) }
        let n = bytes.count
        var value: UInt32
        var length: Int
        if b0 < 0xE0 {
            length = 2; value = UInt32(b0 & 0x1F)
        } else if b0 < 0xF0 {
            length = 3; value = UInt32(b0 & 0x0F)
        } else {
            length = 4; value = UInt32(b0 & 0x07)
        }
        if p + length > n { return (other, n - p) }
        for k in 1..<length { value = (value << 6) | UInt32(bytes[p + k] & 0x3F) }
        guard let scalar = Unicode.Scalar(value) else { return (other, length) }
        return (classify(scalar), length)
    }

    /// Calls `emit` with the byte range of every pre-token of `bytes`, in order; the ranges cover
    /// `bytes` exactly.
    static func scan(_ bytes: UnsafeBufferPointer<UInt8>, _ emit: (Range<Int>) -> Void) {
        let n = bytes.count
        var p = 0
        while p < n {
            let b0 = bytes[p]
            // 's|'t|'re|'ve|'m|'ll|'d
            if b0 == 0x27, p + 1 < n {
                let b1 = bytes[p + 1]
                if b1 == 0x73 || b1 == 0x74 || b1 == 0x6D || b1 == 0x64 {  // s t m d
                    emit(p..<(p + 2)); p += 2; continue
                }
                if p + 2 < n {
                    let b2 = bytes[p + 2]
                    if (b1 == 0x72 && b2 == 0x65) || (b1 == 0x76 && b2 == 0x65) || (b1 == 0x6C && b2 == 0x6C) {  // re ve ll
                        emit(p..<(p + 3)); p += 3; continue
                    }
                }
            }
            let (c0, l0) = scalar(at: p, bytes)
            var q = p + l0
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+` with the optional leading space
            if b0 == 0x20, q < n {
                let (c1, l1) = scalar(at: q, bytes)
                if c1 != space {
                    q += l1
                    while q < n {
                        let (c, l) = scalar(at: q, bytes)
                        if c != c1 { break }
                        q += l
                    }
                    emit(p..<q); p = q; continue
                }
            }
            if c0 != space {
                while q < n {
                    let (c, l) = scalar(at: q, bytes)
                    if c != c0 { break }
                    q += l
                }
                emit(p..<q); p = q; continue
            }
            // `\s+(?!\S)` then `\s+`
            var lastStart = p
            while q < n {
                let (c, l) = scalar(at: q, bytes)
                if c != space { break }
                lastStart = q
                q += l
            }
            if q == n || lastStart == p {
                emit(p..<q); p = q
            } else {
                emit(p..<lastStart); p = lastStart
            }
        }
    }

    /// The pre-tokens of a string (a convenience for tests and tools).
    static func split(_ text: String) -> [String] {
        var copy = text
        return copy.withUTF8 { buffer in
            var pieces: [String] = []
            scan(buffer) { range in
                pieces.append(String(decoding: UnsafeBufferPointer(rebasing: buffer[range]), as: UTF8.self))
            }
            return pieces
        }
    }
}
