import Foundation
import XCTest
@testable import Tokenizers

/// BPE model options on small synthetic tokenizers.
final class BPEModelTests: XCTestCase {
    func testBothMergeEncodingsGiveTheSameTokenizer() throws {
        let vocab = ["a", "b", "c", "ab", "abc", "bc"]
        let strings = makeTokenizerJSON(vocab: vocab, merges: ["a b", "ab c", "b c"])
        var pairs = String(decoding: strings, as: UTF8.self)
        pairs = pairs.replacingOccurrences(of: #""merges": ["a b", "ab c", "b c"]"#,
                                           with: #""merges": [["a", "b"], ["ab", "c"], ["b", "c"]]"#)
        XCTAssertTrue(pairs.contains(#"["ab", "c"]"#))
        let first = try Tokenizer(tokenizerJSON: strings)
        let second = try Tokenizer(tokenizerJSON: Data(pairs.utf8))
        for text in ["abc", "abcabc", "cab", "bcab", "a"] {
            XCTAssertEqual(first.encode(text), second.encode(text), text)
        }
        XCTAssertEqual(first.encode("abc"), [4])
        XCTAssertEqual(first.encode("cabc"), [2, 4])
        XCTAssertEqual(first.encode("bca"), [5, 0])
    }

    func testLowestRankMergesFirst() throws {
        // "b c" outranks "a b", so "abc" becomes a + bc.
        let tokenizer = try Tokenizer(tokenizerJSON: makeTokenizerJSON(vocab: ["a", "b", "c", "ab", "bc"], merges: ["b c", "a b"]))
        XCTAssertEqual(tokenizer.tokens("abc"), ["a", "bc"])
        XCTAssertEqual(tokenizer.tokens("abab"), ["ab", "ab"])
    }

    func testVocabularyKeepsCanonicallyEquivalentTokensApart() throws {
        let tokenizer = try Tokenizer(tokenizerJSON: makeTokenizerJSON(
            vocab: ["\u{e9}", "e", "\u{301}", "e\u{301}"], merges: ["e \u{301}"]))
        XCTAssertEqual(tokenizer.vocabSize, 4)
        XCTAssertEqual(tokenizer.id(for: "\u{e9}"), 0)
        XCTAssertEqual(tokenizer.id(for: "e\u{301}"), 3)
        XCTAssertEqual(tokenizer.encode("\u{e9}"), [0])
        XCTAssertEqual(tokenizer.encode("e\u{301}"), [3])
    }

    func testUnknownTokenFusing() throws {
        let fused = try Tokenizer(tokenizerJSON: makeTokenizerJSON(
            vocab: ["<unk>", "a"], merges: [], model: #""unk_token": "<unk>", "fuse_unk": true"#))
        XCTAssertEqual(fused.encode("axxa"), [1, 0, 1])
        let separate = try Tokenizer(tokenizerJSON: makeTokenizerJSON(
            vocab: ["<unk>", "a"], merges: [], model: #""unk_token": "<unk>", "fuse_unk": false"#))
        XCTAssertEqual(separate.encode("axxa"), [1, 0, 0, 1])
        // Without an unk_token, unknown characters are dropped (as in `tokenizers`).
        let none = try Tokenizer(tokenizerJSON: makeTokenizerJSON(vocab: ["a"], merges: []))
        XCTAssertEqual(none.encode("axa"), [0, 0])
    }

    func testByteFallback() throws {
        let vocab = ["<unk>"] + (0..<256).map { byteFallbackToken(UInt8($0)) } + ["a"]
        let tokenizer = try Tokenizer(tokenizerJSON: makeTokenizerJSON(
            vocab: vocab, merges: [], model: #""unk_token": "<unk>", "byte_fallback": true"#,
            decoder: #"{"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}"#))
        XCTAssertEqual(tokenizer.tokens("aé"), ["a", "<0xC3>", "<0xA9>"])
        XCTAssertEqual(tokenizer.decode(tokenizer.encode("aé🙂")), "aé🙂")
        // An invalid byte run decodes to one U+FFFD per byte.
        XCTAssertEqual(tokenizer.decode([257, 0xC3 + 1, 0xC3 + 1]), "a\u{FFFD}\u{FFFD}")
    }

    func testSubwordPrefixAndSuffix() throws {
        let prefix = try Tokenizer(tokenizerJSON: makeTokenizerJSON(
            vocab: ["a", "##b", "ab"], merges: ["a ##b"], model: ###""continuing_subword_prefix": "##""###))
        XCTAssertEqual(prefix.tokens("ab"), ["ab"])
        let suffix = try Tokenizer(tokenizerJSON: makeTokenizerJSON(
            vocab: ["a", "b</w>", "ab</w>", "b"], merges: ["a b</w>"], model: #""end_of_word_suffix": "</w>""#,
            decoder: #"{"type": "BPEDecoder", "suffix": "</w>"}"#))
        XCTAssertEqual(suffix.tokens("ab"), ["ab</w>"])
        XCTAssertEqual(suffix.decode(suffix.encode("ab")), "ab")
    }

    func testIgnoreMerges() throws {
        let vocab = ["a", "b", "c", "ab", "abc"]
        let ignoring = try Tokenizer(tokenizerJSON: makeTokenizerJSON(vocab: vocab, merges: ["a b"], model: #""ignore_merges": true"#))
        XCTAssertEqual(ignoring.encode("abc"), [4])
        let merging = try Tokenizer(tokenizerJSON: makeTokenizerJSON(vocab: vocab, merges: ["a b"]))
        XCTAssertEqual(merging.encode("abc"), [3, 2])
    }

    func testAddedTokensLongestMatchAndStripping() throws {
        let added = """
            [{"id": 3, "content": "<a>", "special": true, "normalized": false},
             {"id": 4, "content": "<ab>", "special": true, "normalized": false},
             {"id": 5, "content": "<m>", "special": false, "normalized": false, "lstrip": true, "rstrip": true},
             {"id": 6, "content": "cat", "special": false, "normalized": false, "single_word": true}]
            """
        let tokenizer = try Tokenizer(tokenizerJSON: makeTokenizerJSON(
            vocab: ["a", "b", " "], merges: [], addedTokens: added))
        XCTAssertEqual(tokenizer.vocabSize, 7)
        XCTAssertEqual(tokenizer.encode("a<ab>b<a>"), [0, 4, 1, 3])
        XCTAssertEqual(tokenizer.encode("a  <m>  b"), [0, 5, 1])
        XCTAssertEqual(tokenizer.encode("a cat b"), [0, 2, 6, 2, 1])
        XCTAssertEqual(tokenizer.encode("acat"), [0, 0])  // "cat" inside a word is not matched; c, t are unknown
        XCTAssertEqual(tokenizer.decode([0, 4, 5, 1]), "a <m> b")  // no decoder: tokens joined by spaces
        XCTAssertEqual(tokenizer.decode([0, 4, 5, 1], skipSpecialTokens: false), "a <ab> <m> b")
        XCTAssertEqual(tokenizer.specialTokenIDs, [3, 4])
    }

    func testNormalizedAddedTokensAreMatchedAfterNormalization() throws {
        let added = #"[{"id": 2, "content": "HI", "special": false, "normalized": true}]"#
        let tokenizer = try Tokenizer(tokenizerJSON: makeTokenizerJSON(
            vocab: ["h", "i"], merges: [], normalizer: #"{"type": "Lowercase"}"#, addedTokens: added))
        XCTAssertEqual(tokenizer.encode("HI"), [2])
        XCTAssertEqual(tokenizer.encode("hi"), [2])
    }

    func testPostProcessors() throws {
        let template = """
            {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"SpecialToken": {"id": "</s>", "type_id": 0}}],
             "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}, "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
            """
        let tokenizer = try Tokenizer(tokenizerJSON: makeTokenizerJSON(vocab: ["a", "<s>", "</s>"], merges: [], postProcessor: template))
        XCTAssertEqual(tokenizer.encode("aa"), [1, 0, 0, 2])
        XCTAssertEqual(tokenizer.encode("aa", addSpecialTokens: false), [0, 0])
        let bert = #"{"type": "BertProcessing", "sep": ["</s>", 2], "cls": ["<s>", 1]}"#
        let wrapped = try Tokenizer(tokenizerJSON: makeTokenizerJSON(vocab: ["a", "<s>", "</s>"], merges: [], postProcessor: bert))
        XCTAssertEqual(wrapped.encode("a"), [1, 0, 2])
    }
}
