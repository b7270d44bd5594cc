import Foundation
import XCTest
@testable import Tokenizers

/// The hand-written GPT-2 pre-tokenizer and the other pre-tokenizers, against splits produced by
/// Hugging Face `tokenizers` 0.23 (`pre_tokenize_str`).
final class PreTokenizerTests: XCTestCase {
    func testGPT2ScannerMatchesTokenizers() {
        let cases: [(String, [String])] = [
            ("Hello world! It's   a test.\n\tNew", ["Hello", "Ġworld", "!", "ĠIt", "'s", "ĠĠ", "Ġa", "Ġtest", ".", "Ċ", "ĉ", "New"]),
            ("a  b", ["a", "Ġ", "Ġb"]),
            ("x\n\n\ny", ["x", "ĊĊ", "Ċ", "y"]),
            ("end   ", ["end", "ĠĠĠ"]),
            ("   start", ["ĠĠ", "Ġstart"]),
            (" 's ''s !'s 'S 'll'd", ["Ġ'", "s", "Ġ''", "s", "Ġ!'", "s", "Ġ'", "S", "Ġ'", "ll", "'d"]),
            ("e\u{301}t\u{e9} 1\u{bd} \u{661}\u{662} x\u{a0}y\u{3000}z",
             ["e", "Ìģ", "tÃ©", "Ġ1Â½", "ĠÙ¡Ù¢", "Ġx", "Âł", "y", "ãĢĢ", "z"]),
            ("tab\t\tx \u{85}y", ["tab", "ĉ", "ĉ", "x", "Ġ", "Âħ", "y"]),
            ("$3,000.50 -42 x=y+z;", ["$", "3", ",", "000", ".", "50", "Ġ-", "42", "Ġx", "=", "y", "+", "z", ";"]),
            ("🙂👍🏽 東京", ["ðŁĻĤðŁĳįðŁı½", "ĠæĿ±äº¬"]),
            ("", []),
        ]
        for (text, expected) in cases {
            XCTAssertEqual(GPT2PreTokenizerScanner.split(text).map(ByteLevelAlphabet.encode), expected, text.debugDescription)
        }
    }

    func testScannerCoversInputExactly() {
        for text in variedTexts(count: 300, seed: 7) {
            XCTAssertEqual(GPT2PreTokenizerScanner.split(text).joined(), text)
        }
    }

    func testByteLevelAlphabet() {
        XCTAssertEqual(Set(ByteLevelAlphabet.scalarForByte).count, 256)
        XCTAssertEqual(ByteLevelAlphabet.stringForByte[0x20], "Ġ")
        XCTAssertEqual(ByteLevelAlphabet.stringForByte[0x0A], "Ċ")
        XCTAssertEqual(ByteLevelAlphabet.stringForByte[0x41], "A")
        for byte in 0..<256 {
            XCTAssertEqual(ByteLevelAlphabet.byte(for: Unicode.Scalar(ByteLevelAlphabet.scalarForByte[byte])!), UInt8(byte))
        }
    }

    private func decodeStage<T: Decodable>(_ type: T.Type, _ json: String) throws -> T {
        try decodeJSON(type, from: Data(json.utf8), file: "test.json")
    }

    private func split(_ json: String, _ text: String) throws -> [String] {
        try decodeStage(AnyPreTokenizer.self, json).value.preTokenize([Piece(text: text, atStart: true)]).map(\.text)
    }

    func testSplitBehaviors() throws {
        let text = "The-final--countdown"
        let expected: [(String, [String])] = [
            ("Removed", ["The", "final", "countdown"]),
            ("Isolated", ["The", "-", "final", "-", "-", "countdown"]),
            ("MergedWithPrevious", ["The-", "final-", "-", "countdown"]),
            ("MergedWithNext", ["The", "-final", "-", "-countdown"]),
            ("Contiguous", ["The", "-", "final", "--", "countdown"]),
        ]
        for (behavior, pieces) in expected {
            let json = #"{"type": "Split", "pattern": {"String": "-"}, "behavior": "\#(behavior)", "invert": false}"#
            XCTAssertEqual(try split(json, text), pieces, behavior)
        }
        let regex = #"{"type": "Split", "pattern": {"Regex": "\\d+"}, "behavior": "Isolated", "invert": false}"#
        XCTAssertEqual(try split(regex, "ab12cd345"), ["ab", "12", "cd", "345"])
    }

    func testOtherPreTokenizers() throws {
        XCTAssertEqual(try split(#"{"type": "Digits", "individual_digits": true}"#, "ab12cd345"),
                       ["ab", "1", "2", "cd", "3", "4", "5"])
        XCTAssertEqual(try split(#"{"type": "Whitespace"}"#, "Hey man!! How's it going?"),
                       ["Hey", "man", "!!", "How", "'", "s", "it", "going", "?"])
        XCTAssertEqual(try split(#"{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true}"#,
                                 "Hey friend!  How are you?"),
                       ["▁Hey", "▁friend!", "▁", "▁How", "▁are", "▁you?"])
        let sequence = #"{"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, {"type": "Digits", "individual_digits": false}]}"#
        XCTAssertEqual(try split(sequence, "ab12 cd"), ["ab", "12", "cd"])
    }

    func testMetaspaceDecoder() throws {
        let decoder = try decodeStage(AnyTokenDecoder.self, #"{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}"#)
        XCTAssertEqual(decoder.value.decodeChain(["▁Hey", "▁friend", "!", "▁▁How"]).joined(), "Hey friend!  How")
    }

    func testNormalizers() throws {
        let sequence = try decodeStage(AnyNormalizer.self, """
            {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "StripAccents"}, {"type": "Lowercase"},
             {"type": "Strip", "strip_left": true, "strip_right": true}, {"type": "Replace", "pattern": {"Regex": "\\\\s+"}, "content": " "}]}
            """)
        XCTAssertEqual(sequence.value.normalize("  Crème   Brûlée\t"), "creme brulee")
        let prepend = try decodeStage(AnyNormalizer.self, #"{"type": "Prepend", "prepend": "▁"}"#)
        XCTAssertEqual(prepend.value.normalize(""), "")
        XCTAssertEqual(prepend.value.normalize("a"), "▁a")
        // Literal replacement is byte-exact: a space before a combining mark is still replaced.
        let replace = try decodeStage(AnyNormalizer.self, #"{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}"#)
        XCTAssertEqual(replace.value.normalize("a \u{301}b c"), "a▁\u{301}b▁c")
    }
}

/// Text operations work on Unicode scalars (as `tokenizers` does on `char`s), not on grapheme clusters.
final class ScalarSemanticsTests: XCTestCase {
    func testPrefixSpaceCheckLooksAtTheFirstScalar() throws {
        let stage = try decodeJSON(AnyPreTokenizer.self, from: Data(#"{"type": "ByteLevel", "add_prefix_space": true}"#.utf8), file: "t")
        // " \u{301}" is one grapheme, but the text does start with a space: no second space is added.
        XCTAssertEqual(stage.value.preTokenize([Piece(text: " \u{301}x", atStart: true)]).map(\.text), ["ĠÌģ", "x"])  // as `tokenizers` 0.23
        XCTAssertEqual(stage.value.preTokenize([Piece(text: "x", atStart: true)]).map(\.text), ["Ġx"])
    }

    func testSplitInsideAGraphemeCluster() throws {
        let stage = try decodeJSON(AnyPreTokenizer.self, from: Data(
            #"{"type": "Split", "pattern": {"String": "\u0301"}, "behavior": "Isolated", "invert": false}"#.utf8), file: "t")
        XCTAssertEqual(stage.value.preTokenize([Piece(text: "ae\u{301}b", atStart: true)]).map { $0.text.unicodeScalars.map(\.value) },
                       [[0x61, 0x65], [0x301], [0x62]])
    }
}
