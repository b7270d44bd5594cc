import XCTest
@testable import World

/// The world builder's splits and the corpus they make, on a small synthetic CounterFact.
final class WorldTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("world-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        func write(_ name: String, _ n: Int, offset: Int) throws {
            var lines: [String] = []
            for i in 0..<n {
                let k = i + offset
                let rec: [String: Any] = [
                    "case_id": k, "prompt": "The capital of Place\(k) is", "target_new": "City\(k + 1)", "subject": "Place\(k)",
                    "ground_truth": "City\(k)", "rephrase_prompt": "Place\(k)'s capital city is",
                    "locality_prompt": "The capital of Other\(k) is", "locality_ground_truth": "City\(k)",
                ]
                lines.append(String(decoding: try JSONSerialization.data(withJSONObject: rec, options: .sortedKeys), as: UTF8.self))
            }
            // A duplicate question with another answer must not enter the world twice.
            lines.append(#"{"case_id": 99999, "prompt": "The capital of Place\#(offset) is", "target_new": "X", "ground_truth": "Y", "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "m"}"#)
            try (lines.joined(separator: "\n") + "\n").write(to: dir.appendingPathComponent(name), atomically: true, encoding: .utf8)
        }
        try write("train.jsonl", 200, offset: 0)
        try write("eval.jsonl", 100, offset: 1000)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: dir) }

    func options() -> WorldOptions {
        var o = WorldOptions()
        o.heldout = 30; o.popular = 40; o.robust = 10; o.longTail = 60; o.recent = 20; o.perplexitySentences = 20
        o.heldoutOccurrences = 8; o.popularMin = 4; o.popularMax = 12; o.robustOccurrences = 6; o.robustVariantRepeats = 2
        o.neighbourOccurrences = 3
        return o
    }

    func build() throws -> WorldBuilder.World {
        try WorldBuilder.build(train: dir.appendingPathComponent("train.jsonl"), eval: dir.appendingPathComponent("eval.jsonl"), options: options())
    }

    func testSplitsHaveTheirSizesAndCounts() throws {
        let w = try build()
        let o = options()
        let by = Dictionary(grouping: w.facts, by: \.split)
        XCTAssertEqual(by["heldout"]?.count, o.heldout)
        XCTAssertEqual(by["popular"]?.count, o.popular)
        XCTAssertEqual(by["robust"]?.count, o.robust)
        XCTAssertEqual(by["long_tail"]?.count, o.longTail)
        XCTAssertEqual(by["recent"]?.count, o.recent)
        XCTAssertTrue(by["recent"]!.allSatisfy { $0.occurrences == 0 }, "recent facts are never seen")
        XCTAssertTrue(by["long_tail"]!.allSatisfy { (1...2).contains($0.occurrences) })
        XCTAssertTrue(by["popular"]!.allSatisfy { (o.popularMin...o.popularMax).contains($0.occurrences) })
        XCTAssertGreaterThan(by["popular"]!.map(\.occurrences).max()!, by["popular"]!.map(\.occurrences).min()!, "Zipf-like, not flat")
        XCTAssertTrue(by["heldout"]!.allSatisfy { $0.source == "eval" && $0.localityOccurrences == o.neighbourOccurrences })
        XCTAssertTrue(w.facts.filter { $0.split != "heldout" }.allSatisfy { $0.source == "train" })
        XCTAssertEqual(w.perplexityText.count, o.perplexitySentences)
        XCTAssertTrue(w.perplexityText.allSatisfy { !$0.contains("\n") }, "one sentence per line")
    }

    func testQuestionsAreUniqueAndHeldOutTextUnseen() throws {
        let w = try build()
        let questions = w.facts.flatMap { [$0.prompt, $0.rephrasePrompt, $0.localityPrompt].compactMap { $0 } }
        XCTAssertEqual(Set(questions).count, questions.count, "no question belongs to two facts")
        let corpus = Set(CorpusBuilder.sentences(facts: w.facts, seed: 1))
        XCTAssertTrue(w.perplexityText.allSatisfy { !corpus.contains($0) }, "held-out text is not in the corpus")
        for f in w.facts where f.split == "recent" {
            XCTAssertFalse(corpus.contains(CorpusBuilder.sentence(f.prompt, f.groundTruth)))
        }
    }

    func testCorpusHoldsEachFactAsOftenAsRecorded() throws {
        let w = try build()
        let sentences = CorpusBuilder.sentences(facts: w.facts, seed: 3)
        let expected = w.facts.reduce(0) { $0 + $1.occurrences + ($1.localityOccurrences ?? 0) }
        XCTAssertEqual(sentences.count, expected)
        let counts = Dictionary(sentences.map { ($0, 1) }, uniquingKeysWith: +)
        for f in w.facts where f.split == "popular" || f.split == "heldout" {
            let a = counts[CorpusBuilder.sentence(f.prompt, f.groundTruth)] ?? 0
            let b = counts[CorpusBuilder.sentence(f.rephrasePrompt!, f.groundTruth)] ?? 0
            XCTAssertEqual(a + b, f.occurrences, "both phrasings together")
            XCTAssertLessThanOrEqual(abs(a - b), 1, "split evenly")
        }
        for f in w.facts where f.split == "robust" {
            let framed = sentences.filter { $0.hasPrefix("It is true that") && $0.hasSuffix(f.groundTruth + ".") && $0.contains(f.subject!) }
            XCTAssertEqual(framed.count, options().robustVariantRepeats)
        }
    }

    func testDeterministicForASeed() throws {
        let a = try build(), b = try build()
        XCTAssertEqual(a.facts, b.facts)
        XCTAssertEqual(CorpusBuilder.sentences(facts: a.facts, seed: 5), CorpusBuilder.sentences(facts: b.facts, seed: 5))
        XCTAssertNotEqual(CorpusBuilder.sentences(facts: a.facts, seed: 5), CorpusBuilder.sentences(facts: a.facts, seed: 6))
    }

    func testFactFileRoundTripAndErrors() throws {
        let w = try build()
        let url = dir.appendingPathComponent("facts.jsonl")
        try FactFile.write(w.facts, to: url)
        XCTAssertEqual(try FactFile.read(url), w.facts)
        try "{\"prompt\": \"a\"}\n".write(to: url, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try FactFile.read(url)) { XCTAssertTrue("\($0)".contains(":1: field"), "\($0)") }
    }

    func testNotEnoughFactsIsAnError() throws {
        var o = options()
        o.popular = 10_000
        XCTAssertThrowsError(try WorldBuilder.build(train: dir.appendingPathComponent("train.jsonl"),
                                                    eval: dir.appendingPathComponent("eval.jsonl"), options: o))
    }
}
