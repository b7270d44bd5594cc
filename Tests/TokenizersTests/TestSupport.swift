import Foundation
@testable import Tokenizers

/// Builds a tokenizer.json around a BPE model, for small synthetic tokenizers in tests.
func makeTokenizerJSON(vocab: [String], merges: [String], model extra: String = "",
                       normalizer: String = "null", preTokenizer: String = "null",
                       postProcessor: String = "null", decoder: String = "null",
                       addedTokens: String = "[]") -> Data {
    let vocabJSON = vocab.enumerated().map { "\(jsonString($0.element)): \($0.offset)" }.joined(separator: ", ")
    let mergesJSON = merges.map(jsonString).joined(separator: ", ")
    return Data("""
        {"version": "1.0", "truncation": null, "padding": null, "added_tokens": \(addedTokens),
         "normalizer": \(normalizer), "pre_tokenizer": \(preTokenizer),
         "post_processor": \(postProcessor), "decoder": \(decoder),
         "model": {"type": "BPE", \(extra.isEmpty ? "" : extra + ",") "vocab": {\(vocabJSON)}, "merges": [\(mergesJSON)]}}
        """.utf8)
}

/// A deterministic pseudo-random generator (SplitMix64) for test data.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Texts that exercise every corner of byte-level BPE: unicode, digits, whitespace runs, marks.
func variedTexts(count: Int, seed: UInt64) -> [String] {
    var rng = SplitMix64(seed: seed)
    let pools = ["abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " ", "  ", "\t", "\n", "\r\n",
                 "'s 't 're 'S", "!?.,;:-_()[]{}<>@#$%^&*+=~`|\\/\"", "éèêàäöüçñß", "e\u{301}a\u{300}", "ǅﬁ²½",
                 "東京日本語", "русский", "🙂👍🏽👨‍👩‍👧", "\u{a0}\u{2003}\u{3000}\u{85}", "\u{200b}\u{200d}"]
    return (0..<count).map { _ in
        var text = ""
        for _ in 0..<Int.random(in: 1...12, using: &rng) {
            let pool = Array(pools.randomElement(using: &rng)!)
            for _ in 0..<Int.random(in: 1...5, using: &rng) { text.append(pool.randomElement(using: &rng)!) }
        }
        // Some arbitrary scalars too (excluding surrogates).
        for _ in 0..<Int.random(in: 0...3, using: &rng) {
            if let scalar = Unicode.Scalar(UInt32.random(in: 0x20...0x2FFFF, using: &rng)) { text.unicodeScalars.append(scalar) }
        }
        return text
    }
}
