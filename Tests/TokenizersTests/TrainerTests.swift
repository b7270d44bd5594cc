import Foundation
import XCTest
@testable import Tokenizers

/// The byte-level BPE trainer on small generated corpora.
final class TrainerTests: XCTestCase {
    /// A few KB of sentences; " elephant" occurs in every fifth one.
    static func corpus(seed: UInt64 = 11) -> String {
        var rng = SplitMix64(seed: seed)
        let subjects = ["The cat", "A dog", "My friend", "Paris", "The river", "Ångström", "Zoë", "東京"]
        let verbs = ["sees", "likes", "is near", "was born in", "speaks", "owns"]
        let objects = ["the house", "French", "1234 apples", "a tree", "the city of Rome", "42 books"]
        let syllables = ["ka", "lo", "mi", "ren", "sto", "vak", "ul", "bri", "zen", "tha", "qu", "ix", "ør", "ße"]
        var lines: [String] = []
        for i in 0..<200 {
            // A made-up name gives the corpus many distinct pairs.
            let name = (0..<Int.random(in: 2...4, using: &rng)).map { _ in syllables.randomElement(using: &rng)! }.joined()
            var line = "\(subjects.randomElement(using: &rng)!) \(verbs.randomElement(using: &rng)!) \(objects.randomElement(using: &rng)!) with \(name.capitalized)."
            if i % 5 == 0 { line += " An elephant walks." }
            if i % 17 == 0 { line += "  \t double  spaces " }
            lines.append(line)
        }
        return lines.joined(separator: "\n") + "\n"
    }

    func testVocabularySizeSpecialTokensAndDeterminism() throws {
        let options = BPETrainingOptions(vocabSize: 400, specialTokens: ["<|endoftext|>", "<pad>"])
        let first = try BPETrainer.train(text: Self.corpus(), options: options)
        let second = try BPETrainer.train(text: Self.corpus(), options: options)
        XCTAssertEqual(first.vocabulary.count, 400)
        XCTAssertEqual(first.merges.count, 400 - 258)
        XCTAssertEqual(Array(first.vocabulary.prefix(3)), ["<|endoftext|>", "<pad>", "!"])
        XCTAssertEqual(first.vocabulary, second.vocabulary)
        XCTAssertEqual(first.merges, second.merges)
        XCTAssertEqual(first.tokenizerJSON(), second.tokenizerJSON())
        XCTAssertEqual(Set(first.vocabulary).count, first.vocabulary.count)

        let tokenizer = try first.makeTokenizer()
        XCTAssertEqual(tokenizer.vocabSize, 400)
        XCTAssertEqual(tokenizer.bosTokenID, 0)
        XCTAssertEqual(tokenizer.eosTokenID, 0)
        XCTAssertEqual(tokenizer.unkTokenID, 0)
        XCTAssertEqual(tokenizer.modelMaxLength, 1024)
        XCTAssertEqual(tokenizer.specialTokenIDs, [0, 1])
    }

    func testFrequentWordBecomesOneToken() throws {
        let trained = try BPETrainer.train(text: Self.corpus(), options: BPETrainingOptions(vocabSize: 400))
        let tokenizer = try trained.makeTokenizer()
        XCTAssertEqual(tokenizer.tokens(" elephant"), ["Ġelephant"])
        XCTAssertEqual(tokenizer.encode(" elephant").count, 1)
    }

    func testRoundTripsAnyText() throws {
        let trained = try BPETrainer.train(text: Self.corpus(), options: BPETrainingOptions(vocabSize: 350))
        let tokenizer = try trained.makeTokenizer()
        for text in variedTexts(count: 400, seed: 5) + [Self.corpus(seed: 99), "", " ", "<|endoftext|>x"] {
            XCTAssertEqual(tokenizer.decode(tokenizer.encode(text), skipSpecialTokens: false), text, text.debugDescription)
        }
        XCTAssertEqual(tokenizer.encode("a<|endoftext|>b"), tokenizer.encode("a") + [0] + tokenizer.encode("b"))
    }

    func testTiesGoToTheSmallestPairAsInTokenizers() throws {
        // All three pairs of "abcd" occur once; `tokenizers` 0.23 merges a+b, then c+d, then ab+cd.
        let trained = try BPETrainer.train(text: "abcd", options: BPETrainingOptions(vocabSize: 260))
        XCTAssertEqual(trained.merges, [BPEMerge(left: "a", right: "b"), BPEMerge(left: "c", right: "d"),
                                        BPEMerge(left: "ab", right: "cd")])
    }

    func testMinimumFrequencyStopsEarly() throws {
        let trained = try BPETrainer.train(text: Self.corpus(), options: BPETrainingOptions(vocabSize: 5000, minFrequency: 30))
        XCTAssertLessThan(trained.vocabulary.count, 5000)
        XCTAssertGreaterThan(trained.merges.count, 0)
        // Every merged token occurs at least 30 times in the corpus.
        let tokenizer = try trained.makeTokenizer()
        let ids = tokenizer.encode(Self.corpus())
        var counts: [Int: Int] = [:]
        for id in ids { counts[id, default: 0] += 1 }
        let lastMerged = tokenizer.id(for: trained.merges.last!.left + trained.merges.last!.right)!
        XCTAssertNotNil(counts[lastMerged])
    }

    func testWrittenFolderLoadsBack() throws {
        let trained = try BPETrainer.train(text: Self.corpus(), options: BPETrainingOptions(vocabSize: 300, modelMaxLength: 256))
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("tok-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: folder) }
        try trained.write(to: folder)
        let loaded = try Tokenizer.load(folder: folder)
        let built = try trained.makeTokenizer()
        XCTAssertEqual(loaded.modelMaxLength, 256)
        let text = Self.corpus(seed: 4)
        XCTAssertEqual(loaded.encode(text), built.encode(text))
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: folder.appendingPathComponent("tokenizer.json"))) as? [String: Any]
        let model = json?["model"] as? [String: Any]
        XCTAssertEqual(model?["type"] as? String, "BPE")
        XCTAssertEqual((model?["vocab"] as? [String: Any])?.count, 300)
        XCTAssertEqual((json?["pre_tokenizer"] as? [String: Any])?["type"] as? String, "ByteLevel")
    }

    func testTrainingErrors() throws {
        XCTAssertThrowsError(try BPETrainer.train(text: "abc", options: BPETrainingOptions(vocabSize: 200))) { error in
            guard case .invalidTrainingOptions? = error as? TokenizerError else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try BPETrainer.train(text: "", options: BPETrainingOptions(vocabSize: 300))) { error in
            guard case .invalidCorpus? = error as? TokenizerError else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try BPETrainer.train(text: "abc", options: BPETrainingOptions(vocabSize: 300, minFrequency: -1)))
        XCTAssertThrowsError(try BPETrainer.train(text: "abc", options: BPETrainingOptions(vocabSize: 300, specialTokens: [""])))
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("bad-\(UUID().uuidString).txt")
        defer { try? FileManager.default.removeItem(at: file) }
        try Data([0x61, 0x62, 0xFF, 0x63]).write(to: file)
        XCTAssertThrowsError(try BPETrainer.train(corpus: file, options: BPETrainingOptions(vocabSize: 300))) { error in
            XCTAssertEqual(error as? TokenizerError, .invalidCorpus(path: file.path, reason: "not valid UTF-8 (byte offset 2)"))
        }
        let missing = URL(fileURLWithPath: "/nonexistent-\(UUID().uuidString).txt")
        XCTAssertThrowsError(try BPETrainer.train(corpus: missing, options: BPETrainingOptions(vocabSize: 300))) { error in
            XCTAssertEqual(error as? TokenizerError, .fileNotFound(path: missing.path))
        }
    }
}
